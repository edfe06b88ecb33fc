"""A synchronous engine over text: input processor -> engine core -> output processor.

The offline `LLM` drives it in a loop; the async server splits the same three parts across an
asyncio front end and an engine thread.
"""
from __future__ import annotations

from typing import Any, Optional

from .config import EngineArgs, EngineConfig
from .core.engine_core import EngineCore
from .outputs import EngineStats, RequestOutput
from .processing.input_processor import InputProcessor, ProcessedRequest, PromptType
from .processing.output_processor import OutputProcessor
from .sampling_params import SamplingParams
from .utils import startup_timeline


@startup_timeline.span("tokenizer")
def load_text_side(config: EngineConfig) -> tuple[Any, frozenset[int]]:
    """The tokenizer (None with skip_tokenizer_init) and the model's EOS ids."""
    eos: set[int] = set()
    eos_config = getattr(config.model.hf_config, "eos_token_id", None)
    if isinstance(eos_config, int):
        eos.add(eos_config)
    elif isinstance(eos_config, (list, tuple)):
        eos.update(int(t) for t in eos_config)
    if config.model.skip_tokenizer_init:
        return None, frozenset(eos)
    from .processing.tokenizer import eos_token_ids, load_tokenizer

    tokenizer = load_tokenizer(config.model.source)
    return tokenizer, frozenset(eos_token_ids(tokenizer, config.model.hf_config))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer, self.eos_token_ids = load_text_side(config)
        self.core = EngineCore(config)
        self.input_processor = InputProcessor(config, self.tokenizer, self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_config())

    def add_request(self, request_id: Optional[str], prompt: PromptType,
                    params: Optional[SamplingParams] = None, priority: int = 0) -> ProcessedRequest:
        return self.add_processed(self.input_processor.process(request_id, prompt, params, priority))

    def add_processed(self, processed: ProcessedRequest) -> ProcessedRequest:
        """Queues a request the input processor has already validated and tokenized."""
        if self.output_processor.has(processed.request_id):
            raise ValueError(f"request_id {processed.request_id!r} is already in use")
        self.output_processor.add_request(
            processed.request_id, processed.prompt, processed.prompt_token_ids, processed.params,
            [r.request_id for r in processed.core_requests], processed.arrival_time)
        try:
            self.core.add_requests(processed.core_requests)         # all or none
        except ValueError:
            self.output_processor.abort(processed.request_id)
            raise
        return processed

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            self.core.abort_requests(self.output_processor.child_ids(request_id))
            output = self.output_processor.abort(request_id)
            if output is not None:
                outputs.append(output)
        return outputs

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        core_outputs = self.core.step()
        outputs, to_abort = self.output_processor.process(core_outputs, finished_only)
        if to_abort:
            self.core.abort_requests(to_abort)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()

    def shutdown(self) -> None:
        self.core.shutdown()
