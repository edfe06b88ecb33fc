"""Continuous batching: each step mixes running decodes with (chunked) prefills under a token
budget, admits waiting requests in the order of the scheduling policy and preempts by recompute
when the KV cache runs out.

There is no prefill/decode phase split (as in vLLM v1): every request simply has
`num_tokens - num_computed_tokens` tokens left to compute, and a step gives each request as many of
them as the budget allows.

The policy (`SchedulerConfig.policy`, as vLLM's `scheduling_policy`) decides two orders only:

    policy     waiting queue                      preemption victim
    fcfs       arrival order; preempted -> head   the most recently admitted running request
    priority   by (priority, arrival)             the running request with the largest
                                                  (priority, arrival): lowest priority, latest

Liveness under KV pressure. Admission is optimistic (a request gets blocks only for the tokens of
its step), so when every running request grows the cache runs out and a victim is recomputed
later. Left at that, a victim re-admitted as soon as blocks free up is the next victim again: under
a cache that holds only a few long requests one request could be preempted dozens of times, its
prefill recomputed each time. So a request is preempted at most MAX_PREEMPTIONS_PER_REQUEST times,
and after that it comes back only with a *reservation*:

    blocks_to_finish(r) = ceil((min(prompt + max_tokens, max_model_len) - 1) / block_size)
                          the most blocks r ever holds (its last sampled token needs no slot)
    reserved blocks     = sum of blocks_to_finish over the running requests with a reservation
    admission           a request preempted MAX_PREEMPTIONS_PER_REQUEST times waits at its place
                        in the queue until reserved blocks + blocks_to_finish(r) <= num_blocks
    victims             chosen by the policy among the running requests without a reservation

Why every request finishes (for a finite set of requests):
  1. A reserved request is never preempted. When it needs m more blocks, the reserved requests
     hold at most num_blocks - m distinct blocks between them (none holds more than its
     blocks_to_finish, and this one still lacks m), so m blocks are free or held only by
     unreserved requests, and preempting those (the only victims allowed) frees them. Hence no
     request is preempted more than MAX_PREEMPTIONS_PER_REQUEST times.
  2. The potential  sum over unfinished requests of
         (prompt + max_tokens - 1 - num_computed_tokens) + (max_model_len + 1) * preemptions left
     never grows: a step's tokens and prefix-cache hits lower it, and a preemption, which loses at
     most max_model_len - 1 computed tokens, lowers it too. A step that lowers nothing schedules
     nothing and preempts nothing: every running request and the waiting head then wait for a
     token of the step in flight (async scheduling), which arrives before the next step. (A
     waiting head that does not fit finds the cache empty at the latest: one request of up to
     max_model_len fits alone, EngineConfig.finalize_capacity.) So the steps are bounded and all
     requests finish.
In practice the first running request with work gets a whole step's budget, as if it ran alone,
unless it is preempted; so the steps stay below about (MAX_PREEMPTIONS_PER_REQUEST + 1) times
those of running the requests one after another, and every token is computed at most
MAX_PREEMPTIONS_PER_REQUEST + 1 times. Without KV pressure nothing changes: no request is
preempted, so none holds a reservation.

Speculative decoding (engine/spec_decode). `schedule(drafts)` gives a decoding request with K
drafts 1 + K tokens, [last token, d1 .. dK], and KV slots for all of them. Drafts give way: they
are trimmed to leave one budget token for every running request after it and to stay within
max_tokens and max_model_len (so a request never holds more than blocks_to_finish), and dropped
rather than preempt anyone for their slots. Verification keeps `a` drafts: num_computed_tokens is
advanced by a + 1 over the step's start (the K - a rejected slots are overwritten when those
positions are computed again; their blocks stay with the request for its next drafts). Drafts are
never part of the request's token ids, so prefix caching hashes only verified tokens. A step's
net progress is still >= 1 token per scheduled decode, so the liveness argument above holds.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import Optional

from ..config import CacheConfig, SchedulerConfig
from ..outputs import EngineCoreOutput
from ..step import ModelRunnerOutput, NewRequestData, ScheduledRequest, SchedulerOutput
from .kv_cache import KVCacheManager
from .request import Request, RequestStatus

logger = logging.getLogger(__name__)

# NOTE: one. A higher cap lets more requests share the cache early in their lives, at the price of
# more recompute: in simulations of caches that hold one to three long requests, a cap of 3 took
# about 15% fewer steps and computed about 12% more tokens. One keeps every token computed at most
# twice and the bound easy to state.
MAX_PREEMPTIONS_PER_REQUEST = 1


class FCFSPolicy:
    """First come, first served; a request's priority is accepted and ignored.

    Waiting requests keep their arrival order. A preempted request goes back to the head of the
    queue: it arrived before everything that waits. The victim is the last of `running`, the most
    recently admitted request (vLLM v1 pops it).
    """

    name = "fcfs"

    def enqueue(self, waiting: list[Request], request: Request) -> None:
        waiting.append(request)

    def requeue(self, waiting: list[Request], request: Request) -> None:
        waiting.insert(0, request)

    def victim(self, running: list[Request]) -> Request:
        return running[-1]


class PriorityPolicy:
    """Lower `priority` first, then arrival order; preemption takes the running request with the
    largest (priority, arrival): the lowest priority, and among those the latest arrival."""

    name = "priority"

    @staticmethod
    def key(request: Request) -> tuple[int, int]:
        return (request.priority, request.arrival_seq)

    def enqueue(self, waiting: list[Request], request: Request) -> None:
        bisect.insort(waiting, request, key=self.key)

    requeue = enqueue

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=self.key)


SCHEDULING_POLICIES = {policy.name: policy for policy in (FCFSPolicy, PriorityPolicy)}


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 kv_cache_manager: Optional[KVCacheManager] = None) -> None:
        """`kv_cache_manager`: the block allocator to use (default: a KVCacheManager sized by
        `cache_config`); the scheduler calls only its get_computed_blocks, allocate_slots,
        cache_known_blocks, free and block_ids."""
        assert cache_config.num_blocks is not None, "the cache must be sized before scheduling"
        policy = SCHEDULING_POLICIES.get(scheduler_config.policy)
        if policy is None:
            raise ValueError(f"scheduling_policy must be one of {sorted(SCHEDULING_POLICIES)}, "
                             f"got {scheduler_config.policy!r}")
        self.policy = policy()
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks
        self.kv = kv_cache_manager if kv_cache_manager is not None else KVCacheManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []          # in the policy's order; the head is admitted first
        self.running: list[Request] = []          # in admission order
        self._needs_new_data: set[str] = set()    # workers have no state for these yet
        self._dropped: list[str] = []             # workers must forget these
        self._errored: list[Request] = []
        # reserved running requests (preempted MAX_PREEMPTIONS_PER_REQUEST times) -> blocks_to_finish
        self._reservations: dict[str, int] = {}
        self._num_reserved_blocks = 0             # sum of self._reservations.values()
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    # -- queue management ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.policy.enqueue(self.waiting, request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                       ) -> list[Request]:
        """Finishes the requests now and frees their blocks at once."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._finish(request)
            aborted.append(request)
        return aborted

    def _finish(self, request: Request) -> None:
        self._num_reserved_blocks -= self._reservations.pop(request.request_id, 0)
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._needs_new_data.discard(request.request_id)
        self._dropped.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- scheduling -----------------------------------------------------------------------------------
    def _blocks_to_finish(self, request: Request) -> int:
        """The most KV blocks `request` can ever hold: one slot per token up to its last but one
        (the last sampled token is never fed back), whatever the steps in flight."""
        max_len = min(request.num_prompt_tokens + request.max_tokens, self.config.max_model_len)
        return -(-(max_len - 1) // self.block_size)

    def _victim(self) -> Optional[Request]:
        """The policy's victim among the running requests without a reservation (None: all have one)."""
        if not self._reservations:
            return self.policy.victim(self.running)
        candidates = [r for r in self.running if r.request_id not in self._reservations]
        return self.policy.victim(candidates) if candidates else None

    def _preempt(self, victim: Request) -> None:
        """Preemption by recompute: drop the KV, keep every token, go back to the queue head."""
        # (a reserved request is preempted only if the cache is smaller than num_blocks says)
        self._num_reserved_blocks -= self._reservations.pop(victim.request_id, 0)
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.WAITING
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self._dropped.append(victim.request_id)
        self._needs_new_data.add(victim.request_id)
        self.policy.requeue(self.waiting, victim)

    def schedule(self, draft_token_ids: Optional[dict[str, list[int]]] = None) -> SchedulerOutput:
        """Builds one step; `draft_token_ids`: request id -> drafts to verify this step (speculative
        decoding, see the module docstring), used only for requests that are decoding with no token
        in flight.

        Invariants: the step computes at most `max_num_batched_tokens` tokens; at most
        `max_num_seqs` requests run; every scheduled request owns blocks for all of its computed and
        scheduled tokens; running requests are served before waiting ones are admitted, and nothing
        is admitted in a step that had to preempt; no request is preempted more than
        MAX_PREEMPTIONS_PER_REQUEST times, and reserved requests fit the cache together (module
        docstring: why every request finishes).
        """
        budget = self.config.max_num_batched_tokens
        # (request, num_new_tokens (drafts included), num_old_blocks, drafts)
        scheduled: list[tuple[Request, int, int, list[int]]] = []
        preempted_any = False

        # 1. running requests, in admission order; the policy picks who is preempted
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            # with a step in flight, its sampled token is a placeholder the next step consumes on the device
            num_new = min(request.num_tokens + request.num_pending_tokens - request.num_computed_tokens, budget)
            if num_new <= 0 or request.finishes_with_pending(self.config.max_model_len):
                index += 1
                continue
            num_old_blocks = len(self.kv.block_ids(request.request_id))
            drafts = self._usable_drafts(request, draft_token_ids, budget, index) if draft_token_ids else []
            # a draft's slot is never worth a preemption: without room for them the request decodes plainly
            if drafts and not self.kv.allocate_slots(request, num_new + len(drafts)):
                drafts = []
            allocated = bool(drafts)
            while not allocated and not self.kv.allocate_slots(request, num_new):
                # NOTE: None only if a reserved request lacks blocks, which the reservations rule
                # out for a cache of num_blocks; then it is treated as its own victim.
                victim = self._victim() or request
                preempted_any = True
                if victim is request:
                    break
                if self.running.index(victim) < index:
                    index -= 1         # the victim sat before the cursor: `running` shifts under it
                self._preempt(victim)
                # the victim may have been scheduled earlier in this loop: unschedule it
                for i, (r, n, _, _) in enumerate(scheduled):
                    if r is victim:
                        budget += n
                        del scheduled[i]
                        break
            else:
                num_new += len(drafts)
                scheduled.append((request, num_new, num_old_blocks, drafts))
                budget -= num_new
                index += 1
                continue
            # the request itself was the victim
            if len(self.running) == 1 and not scheduled:
                self._fail(request, "the request no longer fits in the whole KV cache")
            else:
                self._preempt(request)

        # 2. admit waiting requests from the head of the queue (the policy keeps it ordered)
        while (self.waiting and budget > 0 and not preempted_any
               and len(self.running) < self.config.max_num_seqs):
            head = self._admissible_head()
            if head is None:
                break          # every waiting request still waits for its grammar
            # NOTE: a request whose grammar is still compiling is passed over, not waited for:
            # compiling never holds up the requests behind it
            request = self.waiting[head]
            if request.num_pending_tokens:
                break          # preempted while its last step is in flight: resume once the token is known
            num_reserved = 0
            if request.num_preemptions >= MAX_PREEMPTIONS_PER_REQUEST:
                num_reserved = self._blocks_to_finish(request)
                if num_reserved > self.num_blocks:
                    self.waiting.pop(head)
                    self._fail(request, (
                        f"request needs {num_reserved} KV blocks to finish but the cache has {self.num_blocks}"))
                    continue
                if self._num_reserved_blocks + num_reserved > self.num_blocks:
                    break      # back only once it can run to completion: the reserved ones go first
            hits, num_hit_tokens = [], 0
            if request.num_computed_tokens == 0:
                hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if not self.kv.allocate_slots(request, num_new, hits):
                if not self.running and not scheduled:
                    # An empty engine cannot fit it: it never will. Fail it rather than hang.
                    self.waiting.pop(head)
                    self._fail(request, (
                        f"request needs {-(-request.num_tokens // self.block_size)} KV blocks but the "
                        f"cache has {self.num_blocks}"))
                    continue
                break
            self.waiting.pop(head)
            if num_reserved:
                self._reservations[request.request_id] = num_reserved
                self._num_reserved_blocks += num_reserved
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self._needs_new_data.add(request.request_id)
            self.running.append(request)
            scheduled.append((request, num_new, 0, []))
            budget -= num_new

        return self._build_output(scheduled)

    def _usable_drafts(self, request: Request, draft_token_ids: dict[str, list[int]], budget: int,
                       index: int) -> list[int]:
        """The drafts of running request `index` that this step can verify: none unless it decodes
        (all but its last token computed, none in flight); at most what max_tokens and max_model_len
        leave room for (the target's own token comes on top); and one budget token left for each
        running request after it."""
        drafts = draft_token_ids.get(request.request_id)
        if not drafts or request.num_pending_tokens or request.num_computed_tokens != request.num_tokens - 1:
            return []
        room = min(request.max_tokens - request.num_output_tokens - 1,
                   self.config.max_model_len - request.num_tokens - 1,
                   budget - 1 - (len(self.running) - index - 1))
        return list(drafts[:max(room, 0)])

    def _admissible_head(self) -> Optional[int]:
        """Index of the first waiting request whose grammar (if any) is compiled; a grammar that
        failed to compile fails its request here."""
        index = 0
        while index < len(self.waiting):
            grammar = self.waiting[index].grammar
            if grammar is None or grammar.matcher is not None:
                return index
            if not grammar.ready:
                index += 1
                continue
            error = grammar.start()
            if error is None:
                return index
            self._fail(self.waiting.pop(index), f"the structured output could not be compiled: {error}")
        return None

    def _fail(self, request: Request, message: str) -> None:
        if request in self.running:
            self.running.remove(request)
        request.status = RequestStatus.FINISHED_ERROR
        request.error = message
        self._finish(request)
        self._errored.append(request)

    def _build_output(self, scheduled: list[tuple[Request, int, int, list[int]]]) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._dropped)
        self._dropped = []
        for request, num_new, num_old_blocks, drafts in scheduled:
            if request.request_id in self._needs_new_data:
                self._needs_new_data.discard(request.request_id)
                num_old_blocks = 0
                out.new_requests.append(NewRequestData(
                    request_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=list(request.output_token_ids),
                    sampling_params=request.sampling_params,
                    seed=request.seed,
                    min_tokens_banned_ids=request.min_tokens_banned_ids,
                ))
            start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
            tokens_end = end - len(drafts)                  # drafts come after every known token
            known_end = min(tokens_end, request.num_tokens)
            sample = tokens_end == request.num_tokens + request.num_pending_tokens
            out.scheduled.append(ScheduledRequest(
                request_id=request.request_id,
                # -1: the token sampled by the step in flight (the runner fills it in on the device)
                token_ids=request.token_ids_slice(start, known_end) + [-1] * (tokens_end - known_end) + drafts,
                num_computed_tokens=start,
                new_block_ids=self.kv.block_ids(request.request_id)[num_old_blocks:],
                sample=sample,
                num_spec_tokens=len(drafts),
            ))
            out.num_scheduled_tokens += num_new
            out.num_spec_tokens += len(drafts)
            if start < request.num_prompt_tokens:
                self.num_prompt_tokens += min(end, request.num_prompt_tokens) - start
            request.num_computed_tokens = end       # NOTE: counted at schedule time (vLLM v1 style)
            if sample:
                request.num_pending_tokens += 1
                if request.grammar is not None:
                    out.structured_request_ids.append(request.request_id)
        return out

    # -- after the forward pass ---------------------------------------------------------------------
    @staticmethod
    def _advance_grammar(request: Request, token: int) -> bool:
        """Feeds the sampled token to the request's matcher; False once the grammar is complete
        (it accepted a stop token), which ends the request whatever ignore_eos says."""
        grammar = request.grammar
        assert grammar is not None and grammar.matcher is not None
        if not grammar.is_terminated and not grammar.accept(token):
            # only a token outside the mask gets here (e.g. every allowed token was banned by
            # min_tokens or logit_bias): the output can no longer match, so end it
            logger.warning("request %s: sampled token %d does not match its grammar; stopping it",
                           request.request_id, token)
            return False
        return not grammar.is_terminated
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for request in self._errored:
            outputs.append(EngineCoreOutput(request.request_id, [], finish_reason="error",
                                            error=request.error))
        self._errored = []
        for item in scheduler_output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.status.is_finished:
                continue          # finished or aborted while this step was in flight
            prompt_logprobs = runner_output.prompt_logprobs.get(item.request_id)
            tokens = runner_output.spec_token_ids.get(item.request_id)
            token_logprobs = runner_output.spec_logprobs.get(item.request_id)
            if tokens is None:
                token = runner_output.sampled_token_ids.get(item.request_id)
                if token is None:
                    if prompt_logprobs is not None:
                        outputs.append(EngineCoreOutput(request.request_id, [],
                                                        new_prompt_logprobs=prompt_logprobs))
                    continue
                tokens = [token]
                logprobs = runner_output.logprobs.get(item.request_id)
                token_logprobs = [logprobs] if logprobs is not None else None
            request.num_pending_tokens -= 1
            if item.num_spec_tokens and request.status == RequestStatus.RUNNING:
                # verified: the last token and len(tokens) - 1 accepted drafts now hold valid KV
                request.num_computed_tokens -= item.num_spec_tokens - (len(tokens) - 1)
            outputs += self._append_tokens(request, tokens, token_logprobs, prompt_logprobs)
        return outputs

    def _append_tokens(self, request: Request, tokens: list[int],
                       token_logprobs: Optional[list[dict[int, float]]],
                       prompt_logprobs: Optional[tuple[int, list]]) -> list[EngineCoreOutput]:
        """Appends a step's tokens in order (several after a verification), each checked against
        the stop conditions: nothing after the token that finishes the request is kept. One output
        per token, so that the output processor, which may find a stop string in any of them,
        drops what follows it as it would in plain decoding."""
        outputs: list[EngineCoreOutput] = []
        finished = False
        for i, token in enumerate(tokens):
            request.output_token_ids.append(token)
            self.num_generation_tokens += 1
            finished = request.check_stop(self.config.max_model_len)
            if request.grammar is not None and not self._advance_grammar(request, token) and not finished:
                request.status = RequestStatus.FINISHED_STOPPED     # the grammar is complete
                finished = True
            outputs.append(EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[token],
                new_logprobs=[token_logprobs[i]] if token_logprobs is not None else None,
                new_prompt_logprobs=prompt_logprobs if i == 0 else None,
                finish_reason=request.finish_reason if finished else None,
                stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                first_scheduled_time=request.first_scheduled_time,
            ))
            if finished:
                break
        self.kv.cache_known_blocks(request)
        if finished:
            # (a request preempted while this step was in flight sits in the waiting queue)
            (self.running if request in self.running else self.waiting).remove(request)
            self._finish(request)
        return outputs
