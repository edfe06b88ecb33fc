"""The benchmark workloads (defined in bench/README.md), deterministic, as lists of `BenchRequest`.

Every request runs with EOS ignored, so it produces exactly `output_len` tokens.

- W256: 256 requests from `random.Random(0)`; per request, in order: prompt length randint(100, 1024),
  output length randint(100, 1024), then the prompt's ids randint(0, 10000). 144,262 prompt tokens,
  144,590 output tokens. (nano-vllm's public benchmark shape.)
- S64: the CPU-sized variant: 64 requests from Random(0); prompt randint(16, 256), output
  randint(16, 128), then ids randint(0, vocab_size - 1).
- shared-prefix: `num_requests` prompts that start with one `prefix_len`-token prefix and end with a
  unique suffix; measures prefix caching. Beyond that shape, the draws are pagoda's, all from one
  Random(0): first the prefix's ids randint(0, vocab_size - 1); then per request, in order, the
  suffix length randint(64, 256) and the suffix's ids randint(0, vocab_size - 1); 128 output tokens
  each. With 2,048 prefix tokens the prefix is 128 whole blocks of 16, so every request after the
  first can reuse all of it.
- batch1: one request, a short prompt (32 ids from Random(0), randint(0, vocab_size - 1)), 256 output
  tokens: decode speed against the weight-bandwidth roofline.
- copy: a real model (it needs the tokenizer) asked to repeat a passage of its prompt: request i gets
  sonnet i + 1 of `bench/data/sonnets.txt` in a chat message, "Repeat this poem exactly" (odd i: "...
  with 'thee' and 'thou' written 'you'", a light edit); output length = the sonnet's token count. 8
  requests by default (run 1 to 8 of them); n-gram speculation finds its drafts in the prompt.

A smaller `num_requests` for W256 / S64 keeps the first requests of the full workload (the draws are
sequential, so the first N requests do not depend on N).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

WORKLOADS = ("w256", "s64", "shared-prefix", "batch1", "copy")

W256_NUM_REQUESTS = 256
W256_PROMPT_TOKENS = 144_262
W256_OUTPUT_TOKENS = 144_590


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def make_w256(num_requests: int = W256_NUM_REQUESTS, seed: int = 0) -> list[BenchRequest]:
    """W256 (seed 0); another seed draws a copy of the same shape with other lengths and ids."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(100, 1024)
        output_len = rng.randint(100, 1024)
        requests.append(BenchRequest([rng.randint(0, 10000) for _ in range(prompt_len)], output_len))
    return requests


def make_s64(vocab_size: int, num_requests: int = 64) -> list[BenchRequest]:
    _check_vocab(vocab_size)
    rng = random.Random(0)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(16, 256)
        output_len = rng.randint(16, 128)
        requests.append(BenchRequest([rng.randint(0, vocab_size - 1) for _ in range(prompt_len)], output_len))
    return requests


def make_shared_prefix(
    vocab_size: int,
    num_requests: int = 256,
    prefix_len: int = 2048,
    suffix_len_range: tuple[int, int] = (64, 256),
    output_len: int = 128,
) -> list[BenchRequest]:
    _check_vocab(vocab_size)
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1, got {prefix_len!r}")
    low, high = suffix_len_range
    if not 1 <= low <= high:
        raise ValueError(f"suffix_len_range must be (low, high) with 1 <= low <= high, got {suffix_len_range!r}")
    rng = random.Random(0)
    prefix = [rng.randint(0, vocab_size - 1) for _ in range(prefix_len)]
    requests = []
    for _ in range(num_requests):
        suffix_len = rng.randint(low, high)
        suffix = [rng.randint(0, vocab_size - 1) for _ in range(suffix_len)]
        requests.append(BenchRequest(prefix + suffix, output_len))
    return requests


def make_batch1(vocab_size: int, prompt_len: int = 32, output_len: int = 256) -> list[BenchRequest]:
    _check_vocab(vocab_size)
    rng = random.Random(0)
    return [BenchRequest([rng.randint(0, vocab_size - 1) for _ in range(prompt_len)], output_len)]


def make_copy(tokenizer: Any, num_requests: int = 8) -> list[BenchRequest]:
    """The copy workload (module docstring): chat prompts through the model's own template."""
    from pagoda.engine.processing.tokenizer import apply_chat_template

    text = (Path(__file__).resolve().parent / "data" / "sonnets.txt").read_text(encoding="utf-8")
    sonnets = [part.strip() for part in re.split(r"\n\s*[IVXLC]+\s*\n", text)[1:] if part.strip()]
    if num_requests > len(sonnets):
        raise ValueError(f"the copy workload has {len(sonnets)} passages; num_requests={num_requests} is more")
    requests = []
    for i, sonnet in enumerate(sonnets[:num_requests]):
        ask = ("Repeat this poem exactly, with nothing before or after it:" if i % 2 == 0 else
               "Repeat this poem exactly, but write 'thee' and 'thou' as 'you', with nothing before or after it:")
        prompt = apply_chat_template(tokenizer, [{"role": "user", "content": f"{ask}\n\n{sonnet}"}])
        output_len = len(tokenizer(sonnet, add_special_tokens=False)["input_ids"])
        requests.append(BenchRequest(list(prompt), output_len))
    return requests


def make_workload(name: str, vocab_size: Optional[int], num_requests: Optional[int] = None,
                  tokenizer: Any = None) -> list[BenchRequest]:
    """The workload `name` (one of WORKLOADS), optionally with another number of requests.

    W256's ids do not depend on the vocabulary: for it `vocab_size` may be None or 0 (unknown), and
    is otherwise checked to hold its ids.
    """
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests!r}")
    if name == "w256":
        if vocab_size and vocab_size <= 10000:
            raise ValueError(f"W256 draws token ids up to 10000; the model's vocabulary ({vocab_size}) is too small")
        return make_w256(num_requests or W256_NUM_REQUESTS)
    if name == "s64":
        return make_s64(vocab_size, num_requests or 64)
    if name == "shared-prefix":
        return make_shared_prefix(vocab_size, num_requests or 256)
    if name == "batch1":
        if num_requests not in (None, 1):
            raise ValueError(f"the batch1 workload is one request; got num_requests={num_requests!r}")
        return make_batch1(vocab_size)
    if name == "copy":
        if tokenizer is None:
            raise ValueError("the copy workload needs the model's tokenizer (a real model, e.g. --model default)")
        return make_copy(tokenizer, num_requests or 8)
    raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")


def total_prompt_tokens(requests: Sequence[BenchRequest]) -> int:
    return sum(r.prompt_len for r in requests)


def total_output_tokens(requests: Sequence[BenchRequest]) -> int:
    return sum(r.output_len for r in requests)


def _check_vocab(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
