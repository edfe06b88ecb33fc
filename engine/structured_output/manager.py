"""Structured output inside the engine core: grammars compiled off the step loop, one matcher per
request, and the step's token bitmask filled while the forward pass runs.

    add_request    a constrained request gets a `RequestGrammar` whose grammar compiles on the
                   manager's thread (cached by spec); the scheduler admits it once `ready`
    grammar_output after the step's forward pass was launched (and the previous step's tokens
                   were accepted): one bitmask row per constrained request that samples
    accept         each sampled token advances the request's matcher (update_from_output)

The compiler (the tokenizer's vocabulary in xgrammar's form) is built on first use, on the same
thread: an engine that never sees a constrained request never loads it.

Invariant: a request's matcher has accepted exactly its output tokens. Preemption keeps both (the
tokens are recomputed, not resampled), so nothing is rolled back.
"""
from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Optional

from ..step import GrammarOutput, SchedulerOutput
from . import backend
from .params import GrammarSpec, StructuredOutputsParams

logger = logging.getLogger(__name__)


class RequestGrammar:
    """One request's grammar: compiling, then a matcher over its output tokens."""

    def __init__(self, compiled: "Future[Any]", stop_token_ids: frozenset[int],
                 after_token_ids: Optional[list[int]] = None) -> None:
        self._compiled = compiled
        self._stop_token_ids = stop_token_ids
        self.matcher: Optional[Any] = None
        # the constraint holds from the token after this sequence on (None: from the first token)
        self._after = after_token_ids
        self._tail: list[int] = []             # the last len(after) output tokens, while not active
        self.active = after_token_ids is None

    @property
    def ready(self) -> bool:
        return self._compiled.done()

    def start(self) -> Optional[str]:
        """Builds the matcher once the grammar is compiled; returns why it cannot be (None = fine)."""
        if self.matcher is None:
            error = self._compiled.exception()
            if error is not None:
                return f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
            self.matcher = backend.new_matcher(self._compiled.result(), self._stop_token_ids)
        return None

    def accept(self, token_id: int) -> bool:
        """Advances over a sampled token; False when the grammar does not allow it (then unchanged).
        Before the constraint holds, a token only moves the watch for `after_token_ids`."""
        assert self.matcher is not None, "accept before start"
        if not self.active:
            assert self._after is not None
            self._tail = (self._tail + [token_id])[-len(self._after):]
            self.active = self._tail == self._after
            return True
        return bool(self.matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()


class StructuredOutputManager:
    def __init__(self, vocab_size: int, load_tokenizer: Callable[[], Any],
                 fill_threads: Optional[int] = None) -> None:
        """vocab_size: the model's logits width; load_tokenizer: builds the tokenizer on first use;
        fill_threads: threads that fill a step's bitmask (None: `BitmaskFiller.default_threads()`)."""
        self.vocab_size = vocab_size
        self.filler = backend.BitmaskFiller(fill_threads or backend.BitmaskFiller.default_threads())
        self._load_tokenizer = load_tokenizer
        self._compiler: Optional[backend.GrammarCompiler] = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pagoda-grammar")

    def grammar_for(self, params: StructuredOutputsParams, stop_token_ids: frozenset[int]) -> RequestGrammar:
        return RequestGrammar(self._thread.submit(self._compile, params.spec()), stop_token_ids,
                              params.after_token_ids)

    def _compile(self, spec: GrammarSpec) -> Any:
        if self._compiler is None:
            self._compiler = backend.GrammarCompiler(self._load_tokenizer(), self.vocab_size)
        return self._compiler.compile(spec)

    @staticmethod
    def wait_for_any(grammars: list[RequestGrammar], timeout_s: float) -> None:
        wait([grammar._compiled for grammar in grammars], timeout=timeout_s, return_when=FIRST_COMPLETED)

    @property
    def num_compiled(self) -> int:
        return self._compiler.num_compiled if self._compiler is not None else 0

    def grammar_output(self, scheduler_output: SchedulerOutput,
                       grammars: dict[str, Optional[RequestGrammar]]) -> GrammarOutput:
        """The bitmask of the step's constrained sampling rows, in `structured_request_ids` order.

        `grammars` maps a request id to its grammar (None: the request finished meanwhile; its row
        allows everything, and its token is dropped). A grammar not yet active (`after_token_ids`
        not seen) allows everything too: whether it is active is known only now, after the previous
        step's token, which is why such rows wait for their mask like the others."""
        request_ids = scheduler_output.structured_request_ids
        bitmask = backend.allocate_bitmask(len(request_ids), self.vocab_size)   # (R, W) int32, all allowed
        matchers, indices = [], []
        for index, request_id in enumerate(request_ids):
            grammar = grammars.get(request_id)
            if grammar is not None and grammar.matcher is not None and grammar.active and not grammar.is_terminated:
                matchers.append(grammar.matcher)
                indices.append(index)
        self.filler.fill(matchers, bitmask, indices)
        return GrammarOutput(request_ids=list(request_ids), bitmask=bitmask.numpy())

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self.filler.shutdown()

