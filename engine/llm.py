"""The offline API, named as vLLM's so users can switch:

    from pagoda.engine import LLM, SamplingParams
    llm = LLM(model="default")
    outputs = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=32))

Without SamplingParams, `generate` and `chat` sample with the model's defaults (its
generation_config.json, unless `generation_config="vllm"`: engine/generation_defaults.py); a
SamplingParams passed is used as given. `get_default_sampling_params()` returns the model's defaults,
to change a few fields of.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from tqdm.auto import tqdm

from .config import EngineArgs
from .llm_engine import LLMEngine
from .outputs import EngineStats, RequestOutput
from .processing.input_processor import PromptType
from .processing.tokenizer import apply_chat_template
from .sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str = "default",
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: Optional[int] = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: Optional[int] = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: Optional[int] = None,
        seed: int = 0,
        device: str = "auto",
        **kwargs: Any,
    ) -> None:
        known = set(EngineArgs.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {unknown}; accepted: {sorted(known)}")
        args = EngineArgs(
            model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            enable_prefix_caching=enable_prefix_caching, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes, seed=seed, device=device, **kwargs)
        self.engine = LLMEngine.from_engine_args(args)
        self._request_counter = 0

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The parameters of a request that sets none: the model's generation defaults over pagoda's."""
        return self.engine.config.model.generation_defaults.sampling_params()

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        priority: Optional[Sequence[int]] = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order.

        `priority`: one integer per prompt, lower runs first; it orders requests only under
        `scheduling_policy="priority"` (under "fcfs" it is accepted and ignored).
        All prompts are validated before any is queued, so a bad one leaves the engine untouched.
        """
        prompt_list = self._as_prompt_list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params or self.get_default_sampling_params()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(priorities) != len(prompt_list):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompt_list)} prompts")

        # validate and tokenize every prompt before queueing any
        processed = []
        for prompt, params, prio in zip(prompt_list, params_list, priorities):
            processed.append(self.engine.input_processor.process(
                f"offline-{self._request_counter + len(processed)}", prompt, params, prio))
        self._request_counter += len(processed)
        for request in processed:
            self.engine.add_processed(request)
        return self._run([request.request_id for request in processed], use_tqdm)

    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (or a list of them) and generates."""
        if self.engine.tokenizer is None:
            raise ValueError("chat needs a tokenizer; the engine was started with skip_tokenizer_init=True")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.engine.tokenizer, conv)} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def get_metrics(self) -> EngineStats:
        return self.engine.get_stats()

    def _as_prompt_list(self, prompts: Any) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)):
            if prompts and all(isinstance(t, int) for t in prompts):
                return [list(prompts)]          # one prompt given as token ids
            return list(prompts)
        raise ValueError(f"prompts must be a string, a dict or a list of them, got {type(prompts).__name__}")

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while pending:
                for output in self.engine.step(finished_only=True):
                    if output.finished and output.request_id in pending:
                        finished[output.request_id] = output
                        pending.discard(output.request_id)
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(list(pending))
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __del__(self) -> None:  # best effort: let multiproc workers go
        try:
            self.engine.shutdown()
        except Exception:
            pass
