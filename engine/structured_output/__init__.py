"""Structured output: constraining what a request generates to a JSON schema, regex, choice or grammar.

    params.py    StructuredOutputsParams (what a request asks for) and GrammarSpec (its cache key)
    backend.py   the grammar engine (xgrammar): validate, compile, match, fill bitmasks
    manager.py   inside the engine core: compiles off the step loop, one matcher per request,
                 the step's bitmask filled while the forward pass runs

The bitmask is applied on the device by the sampler (`pagoda.kernels.token_bitmask`); a step
without a constrained request pays nothing.
"""
