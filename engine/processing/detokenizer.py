"""Incremental detokenization and stop strings.

Text is decoded over a small sliding window of token ids (vLLM's prefix/read offsets), seeded with
the prompt's last tokens so a first output token keeps its leading space. A window whose text ends
in U+FFFD (an incomplete multi-byte character) emits nothing until the character completes, so a
broken character is never emitted.

Stop strings: when one appears, the text is cut before it (or after it with
`include_stop_str_in_output`) and the request finishes. While streaming, the last
`len(longest stop) - 1` characters are held back, since they may turn out to start a stop string.
"""
from __future__ import annotations

from typing import Any, Optional

_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool, skip_special_tokens: bool, min_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.min_tokens = min_tokens
        context = prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.num_output_tokens = 0
        self.text = ""
        self.stop_reason: Optional[str] = None
        self.max_stop_len = max((len(s) for s in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> Optional[str]:
        """Appends generated tokens; returns the matched stop string if one ended the text."""
        for token in token_ids:
            self.ids.append(token)
            self.num_output_tokens += 1
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full_text = self._decode(self.ids[self.prefix_offset:])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                delta = full_text[len(prefix_text):]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.ids)
                self.text += delta
                if self.stop and self.num_output_tokens > self.min_tokens:
                    if self._check_stop(len(delta)):
                        return self.stop_reason
        return None

    def _check_stop(self, delta_len: int) -> bool:
        # only the region the new text could complete needs searching
        search_from = max(0, len(self.text) - delta_len - self.max_stop_len + 1)
        best: Optional[tuple[int, str]] = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return False
        index, stop = best
        self.text = self.text[: index + len(stop)] if self.include_stop_str_in_output else self.text[:index]
        self.stop_reason = stop
        return True

    def streamable_text(self, finished: bool) -> str:
        """The text that can be sent now: all of it when finished, else minus a possible stop prefix."""
        if finished or not self.stop or self.stop_reason is not None:
            return self.text
        return self.text[: max(0, len(self.text) - (self.max_stop_len - 1))]
