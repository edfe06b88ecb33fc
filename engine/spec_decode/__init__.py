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
- on the worker, inside the verifying step (`draft_model.py`, method "draft_model"): the host side
  only reserves room (`DraftSlotsProposer` answers K placeholder drafts, which the scheduler trims
  and gives slots to exactly as n-gram drafts); right before the target's forward pass the runner's
  `DraftModelDrafter` runs a smaller model over each speculating request (a catch-up over its known
  tokens, then K - 1 one-token steps) and writes its greedy tokens over the placeholders, on the
  device, with no host sync; verification reads them from there. It keeps the draft's weights (the
  target's dtype and TP split), a KV cache of its own paged with the TARGET's block ids (the KV
  budget counts both models per block), each request's tokens by position on the device, and per
  request how many positions of its own KV are right. Greedy drafts are a point-mass proposal, so
  the verification above is exact for them; drafting from the draft's distribution with
  `rejection_sample` is a later improvement.
- (not built yet) EAGLE / MTP heads, which need the target's hidden states at the accepted
  positions: they would run right after verification and return next step's drafts (and their
  probabilities) with the ModelRunnerOutput, handed to `Scheduler.schedule` as the host proposer's.

Not speculating: requests with structured output (their grammar advances token by token on the
host), requests still in prefill, and a step at a batch size where speculation does not pay (below).
They are
still served exactly, in the same steps as speculating requests. Requests with n > 1, penalties,
logit_bias, min_tokens, logprobs or a seed do speculate, each draft position sampled with its own
row (penalties count the drafts before it); prompt logprobs come from the prefill, before a request
may speculate.

From which batch size speculation stops paying is measured, not guessed (step_costs.py): unless the
user sets `disable_by_batch_size`, the engine times each verification graph against the decode graph
of the same batch at start-up and speculates in a step only while the acceptance it observes pays for
that ratio; where nothing can be timed (CPU, eager mode, a draft model) it stops at
DEFAULT_SPEC_DISABLE_BY_BATCH_SIZE requests. A verifying step is not a pure decode, so the decode
CUDA graphs cannot replay it: it replays graphs of its own (engine/worker/verify_graphs.py), every
sequence padded at the front to 1 + K rows, captured at start-up for batches below
disable_by_batch_size (up to 64 without one, or with a measured cutoff); a step with a chunk of more
than 1 + K tokens (a prefill), a larger batch or a context of <= 1 + K tokens runs eagerly.
"""
