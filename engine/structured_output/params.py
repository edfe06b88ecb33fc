"""What a request asks its output to match: vLLM's `StructuredOutputsParams`, plain data.

Exactly one of the constraints is set:

    json         a JSON schema (dict or JSON text): the output is one JSON value valid against it
    json_object  any JSON object (OpenAI's response_format {"type": "json_object"})
    regex        the output fully matches the regular expression
    choice       the output is exactly one of the strings
    grammar      the output is a sentence of the EBNF/GBNF grammar (root rule `root`)

Validation here is structural (one constraint, the right types); whether a schema, regex or grammar
compiles is the grammar backend's check (`backend.validate`), done before the request reaches the
engine so that a bad one is a 400 with nothing generated.

`after_token_ids` delays the constraint: the output is free until it contains that token sequence
(a reasoning model's end of thinking, e.g. Qwen3's `</think>` token), and constrained from the next
token on, so the reasoning stays free and the answer matches. The servers set it with a reasoning
parser; it is not part of the grammar (nor of its cache key).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint in canonical form: the key of the compiled-grammar cache (hashable, picklable)."""

    kind: str                  # one of "json", "json_object", "regex", "choice", "grammar"
    # the schema as JSON text (its key order kept: properties are generated in that order), the regex,
    # the choices as JSON, or the grammar
    source: str


@dataclass
class StructuredOutputsParams:
    json: Optional[Union[str, dict[str, Any]]] = None
    json_object: Optional[bool] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    # accepted for compatibility with vLLM's field; the backend's own default is always used
    disable_any_whitespace: bool = False
    after_token_ids: Optional[list[int]] = None

    def __post_init__(self) -> None:
        chosen = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, "
                             f"grammar; got {chosen or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as error:
                raise ValueError(f"structured_outputs.json is not valid JSON: {error}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be a boolean, got {self.json_object!r}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"structured_outputs.grammar must be a non-empty string, got {self.grammar!r}")
        if self.after_token_ids is not None and (
                not isinstance(self.after_token_ids, list) or not self.after_token_ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.after_token_ids)):
            raise ValueError("structured_outputs.after_token_ids must be a non-empty list of token ids, "
                             f"got {self.after_token_ids!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")

    def spec(self) -> GrammarSpec:
        if self.json is not None:
            return GrammarSpec("json", json.dumps(self.json, separators=(",", ":")))
        if self.json_object:
            return GrammarSpec("json_object", "")
        if self.regex is not None:
            return GrammarSpec("regex", self.regex)
        if self.choice is not None:
            return GrammarSpec("choice", json.dumps(self.choice))
        assert self.grammar is not None
        return GrammarSpec("grammar", self.grammar)
