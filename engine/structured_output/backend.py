"""The grammar engine behind structured output: xgrammar, reached only through this module.

    grammar_of(spec)        the tokenizer-independent grammar (what `validate` checks, cheaply)
    GrammarCompiler         a spec -> its compiled grammar for one vocabulary, cached by the spec
    new_matcher(compiled)   one request's matcher: accept_token / fill_next_token_bitmask / is_terminated
    fill_bitmask            the step's mask rows of many matchers (BitmaskFiller: over threads)

Why xgrammar (measured on the default model's 49,152-token vocabulary, one CPU core): its
next-token mask costs ~2 us per request and step (p50; llguidance ~5-6 us, with tails up to ~1.8 ms),
which is the cost paid on every step of every constrained request; compiling a new JSON schema
costs 3-8 ms (llguidance ~1.5 ms), paid once per schema, off the step loop and then cached.

JSON is generated compact (no free whitespace between tokens): a model cannot wander into endless
whitespace, and the output is still exactly the JSON the schema describes.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from .params import GrammarSpec

_CACHE_SIZE = 1024          # compiled grammars kept (a few KB to a few MB each)
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


def _xgrammar() -> Any:
    import xgrammar

    return xgrammar


def grammar_of(spec: GrammarSpec) -> Any:
    """The xgrammar `Grammar` of `spec`; ValueError names the field and the parser's complaint."""
    xgr = _xgrammar()
    try:
        if spec.kind == "json":
            return _json_grammar(xgr, spec.source)
        if spec.kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.source)
        if spec.kind == "choice":
            # one EBNF alternative per choice, each a string literal (JSON escapes are EBNF escapes)
            choices = json.loads(spec.source)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        if spec.kind == "grammar":
            return xgr.Grammar.from_ebnf(spec.source)
    except (RuntimeError, ValueError, TypeError) as error:
        # the parser's message, without its "[time] file.cc:line: " prefix
        message = _LOG_PREFIX.sub("", " ".join(str(error).split()))[:500] or type(error).__name__
        raise ValueError(f"structured_outputs.{spec.kind} is not valid: {message}") from None
    raise ValueError(f"unknown structured output kind {spec.kind!r}")


# NOTE: xgrammar writes the characters of a length-bounded JSON string (minLength / maxLength) as
# [^"\\\r\n], which lets raw control characters through, and JSON forbids them (a model that emits
# one would produce invalid JSON). The same class without U+0000-U+001F is what its unbounded strings use.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _json_grammar(xgr: Any, schema: str) -> Any:
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


def validate(spec: GrammarSpec) -> None:
    """Raises ValueError when `spec` cannot be compiled (before any token is generated)."""
    grammar_of(spec)


class GrammarCompiler:
    """Compiles specs for one tokenizer's vocabulary (of `vocab_size` logits), cached by spec.

    Thread-safe; compiling is meant for a background thread, never the step loop.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0          # cache misses (for tests and the bench)

    def compile(self, spec: GrammarSpec) -> Any:
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        compiled = self._compiler.compile_grammar(grammar_of(spec))
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


def new_matcher(compiled: Any, stop_token_ids: Iterable[int]) -> Any:
    """A fresh matcher at the grammar's start; it ends on (and only on) one of `stop_token_ids`."""
    return _xgrammar().GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids))


def allocate_bitmask(num_rows: int, vocab_size: int) -> Any:
    """(num_rows, ceil(vocab_size / 32)) int32 torch tensor, every token allowed."""
    return _xgrammar().allocate_token_bitmask(num_rows, vocab_size)


def fill_bitmask(matchers: list[Any], bitmask: Any, indices: list[int]) -> None:
    """Fills row indices[i] of `bitmask` with matchers[i]'s allowed next tokens, on this thread."""
    for matcher, index in zip(matchers, indices):
        matcher.fill_next_token_bitmask(bitmask, index)


class BitmaskFiller:
    """`fill_bitmask` spread over `num_threads` threads in chunks of at least `min_rows_per_thread`.

    xgrammar releases the GIL while it fills a row (~20-35 us per row over a 128K-token vocabulary),
    so chunks on separate threads run in parallel: on a GPU host the mask of a 256-row step is the
    largest piece of the engine's host work per step, and it must fit beside the forward pass.
    NOTE: a pool of our own, kept for the engine's life, rather than xgrammar's batch fill, which
    starts its threads per call. With one thread (the default on small hosts) it is the plain loop."""

    def __init__(self, num_threads: int, min_rows_per_thread: int = 32) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self.min_rows_per_thread = min_rows_per_thread
        self._pool = ThreadPoolExecutor(num_threads - 1, thread_name_prefix="pagoda-mask") if num_threads > 1 else None

    @staticmethod
    def default_threads() -> int:
        """A quarter of the host's cores, at most 4: the rest serve the step loop, tokenizers and
        the server (1 on a 2-core machine, where threads only contend)."""
        return max(1, min(4, (os.cpu_count() or 1) // 4))

    def fill(self, matchers: list[Any], bitmask: Any, indices: list[int]) -> None:
        num_chunks = min(self.num_threads, len(matchers) // self.min_rows_per_thread)
        if self._pool is None or num_chunks < 2:
            fill_bitmask(matchers, bitmask, indices)
            return
        bounds = [len(matchers) * i // num_chunks for i in range(num_chunks + 1)]
        # chunks 1.. on the pool, chunk 0 on this thread meanwhile
        futures = [self._pool.submit(fill_bitmask, matchers[lo:hi], bitmask, indices[lo:hi])
                   for lo, hi in zip(bounds[1:-1], bounds[2:])]
        fill_bitmask(matchers[:bounds[1]], bitmask, indices[:bounds[1]])
        for future in futures:
            future.result()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
