"""The text side of a request, kept off the step loop.

    tokenizer.py          loading the tokenizer, chat templates, EOS ids, prompt-size bound, tokenizer thread
    input_processor.py    prompt + SamplingParams -> validated, tokenized core Requests (n > 1 fans out)
    detokenizer.py        incremental detokenizing and stop strings
    output_processor.py   core outputs -> RequestOutputs (text deltas, logprobs, n > 1 gathered)
"""
