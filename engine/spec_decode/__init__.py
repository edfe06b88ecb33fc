"""Speculative decoding: propose a few draft tokens per request, verify them all in one forward pass
of the target model, keep the longest prefix the target agrees with, plus one token of its own.

    engine core (host)                                     worker (model runner + sampler)
    SpecDecodeController.propose(running) -> drafts
      gating: batch size, per-request acceptance
      Proposer.propose(requests) -> {id: drafts}
    Scheduler.schedule(drafts): a request with K     ──>   one chunk [last, d1 .. dK], as in chunked
      drafts computes 1 + K tokens, KV slots for all        prefill; logits at all 1 + K positions,
                                                            each sampled as a plain step would
    Scheduler.update_from_output: num_computed    <──   the accepted drafts (a of them), then the
      += a + 1; stop checks token by token                  target's own next token: 1 .. 1 + K tokens
    SpecDecodeController.observe: metrics, acceptance

Exactness. Position by position the runner samples the target exactly as a plain step would (same
logits processing, same per-position seed stream) and accepts a draft while it equals that sample.
For a point-mass draft (n-gram) this *is* rejection sampling: the draft d is accepted with
probability p(d), and given a rejection the target's sample is distributed as p without d,
renormalised. Greedy is the temperature-0 case. A seeded request gives the same tokens with and
without speculation. `rejection.py` holds the general rule (accept with min(1, p/q), resample from
max(p - q, 0)) for proposers whose drafts come with a distribution q.

Where proposers run, and what they get:
- on the host, in the engine core (`Proposer`, e.g. `NgramProposer`): the running requests' token ids,
  after the previous step's tokens are known. Under async scheduling such a step waits for the
  previous one (engine/core/engine_core.py says what that costs).
- on the worker (not built yet: EAGLE / MTP heads, a draft model). Such a proposer runs in the
  model runner right after verification, where it has what the host has not: the target's hidden
  states at the accepted positions (EAGLE, MTP) or its own weights and a KV cache of its own,
  paged with the target's block tables (draft model). It returns next step's drafts (and, for
  rejection sampling, their probabilities) with the ModelRunnerOutput; the engine core hands them to
  `Scheduler.schedule` exactly as it hands the host proposer's, so the scheduler does not change.

Not speculating: requests with structured output (their grammar advances token by token on the
host), requests still in prefill, and a step whose batch has reached `disable_by_batch_size`. They are
still served exactly, in the same steps as speculating requests. Requests with n > 1, penalties,
logit_bias, min_tokens, logprobs or a seed do speculate, each draft position sampled with its own
row (penalties count the drafts before it); prompt logprobs come from the prefill, before a request
may speculate.

From which batch size speculation stops paying on a GPU is to be measured there
(config.DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE). A verifying step is not a pure decode, so it runs
without the decode CUDA graphs.
"""
