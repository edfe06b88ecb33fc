"""Runs one forward pass per step over the flattened batch, and samples.

All per-step device inputs are built in one place (`_prepare_inputs`, into a `StepInputs`) from
the scheduler's descriptor and passed explicitly to the model:

    scheduled:  A (prefill chunk, 5 tokens)      B (decode, 1 token)
    input_ids   [a5 a6 a7 a8 a9 | b41]           positions [5 6 7 8 9 | 41]
    query_start_loc [0, 5, 6]                    seq_lens  [10, 42]
    slot_mapping    block_table[pos // bs] * bs + pos % bs for each token
    logits_indices  rows whose hidden state feeds the sampler (last token of a finished prefill
                    or decode), plus every prompt row of requests asking for prompt logprobs

Speculative decoding: a request verifying K drafts is a chunk [last, d1 .. dK] whose 1 + K rows all
feed the sampler; each row is sampled as a plain step would sample that position (its own seed
position, min_tokens, penalties counting the drafts before it), and the drafts are accepted while
they equal those samples (engine/spec_decode/rejection.py). The answer carries 1 .. 1 + K tokens.

Every TP rank runs the model; only rank 0 samples (`is_driver`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch

from pagoda.kernels.metadata import AttentionMetadata

from ..config import EngineConfig, ModelConfig
from ..distributed.parallel_state import get_tp_rank, get_tp_size, tp_broadcast
from ..layers.moe import MoeOptions
from ..models.registry import get_model_class, is_moe_model
from ..quantization.base import init_dummy_weights
from ..spec_decode.draft_model import build_drafter
from ..spec_decode.rejection import accepted_prefix
from ..spec_decode.step_costs import StepCosts
from ..step import (GrammarOutput, ModelRunnerOutput, NewRequestData, ScheduledRequest, SchedulerOutput,
                    StepHandle)
from ..utils import startup_timeline
from . import paged_kv_cache
from .prompt_logprobs import prompt_logprobs
from .sampler import Sampler, SamplingRow, TokenMask
from .step_inputs import BlockTable, PinnedStaging, Placeholders, PromptRows, SamplingLayout, StepInputs
from .step_profiler import StepProfiler

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass
class CachedRequestState:
    data: NewRequestData
    row: int                                   # its row in the runner's BlockTable
    output_token_ids: list[int] = field(default_factory=list)
    # sampling is a plain argmax: greedy, no logprobs, penalties, biases, min_tokens or grammar
    plain_greedy: bool = False


class ModelRunner:
    def __init__(self, config: EngineConfig, is_driver: bool = True) -> None:
        self.config = config
        self.device = config.device
        self.dtype = config.model.dtype
        self.block_size = config.cache.block_size
        self.is_driver = is_driver
        if self.device.type == "cuda":
            torch.empty(1, device=self.device)      # NOTE: the CUDA context, here rather than in the weights' time
        self._check_kv_cache_dtype()
        startup_timeline.mark("device init")
        self.model = self._load_model()
        startup_timeline.mark("weights")
        if get_tp_rank() == 0:
            weight_bytes = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
            served = config.serving_format()
            logger.info("weights: %s (%.1f MB on rank 0); KV cache: %s", served["weights"], weight_bytes / 1e6,
                        served["kv_cache_dtype"])
        self.sampler = Sampler(self.device, config.model.seed)
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_cache: Optional[torch.Tensor] = None
        self.graphs = None            # DecodeGraphs once captured
        self.verify_graphs = None     # VerifyGraphs once captured (speculative decoding)
        max_blocks_per_seq = -(-config.model.max_model_len // self.block_size)
        self.block_table = BlockTable(config.scheduler.max_num_seqs, max_blocks_per_seq)
        self.staging = PinnedStaging(self.device)
        # method "draft_model": the draft model, its KV cache and graphs (else None)
        self.drafter = build_drafter(self.config, self._load_model, self.block_table, self.staging, self.requests)
        # async scheduling: the last step's sampled ids stay on the device for the next step's input
        self.prev_sampled: Optional[torch.Tensor] = None
        self.prev_rows: dict[str, int] = {}
        self._unresolved: Optional[StepHandle] = None
        # a launched step whose sampling waits for its grammar bitmask: (step, logits, prompt rows)
        self._awaiting_mask: Optional[tuple[SchedulerOutput, torch.Tensor, dict[str, PromptRows]]] = None
        # async scheduling under TP: every rank needs the sampled ids of the step before
        self._shares_sampled_ids = config.scheduler.async_scheduling and get_tp_size() > 1
        self._host_slot = 0
        # one sampling row per request, 1 + K for a request verifying K drafts
        rows_per_seq = 1 + (config.speculative.num_speculative_tokens if config.speculative is not None else 0)
        self._host_tokens = [torch.empty(config.scheduler.max_num_seqs * rows_per_seq, dtype=torch.int64,
                                         pin_memory=self.device.type == "cuda") for _ in range(2)]
        self.profiler = StepProfiler.from_env(get_tp_rank(), self.device)     # None unless asked for
        # --calculate-kv-scales: the first step with real tokens sets the FP8 cache's scales
        self._kv_scales_pending = config.cache.calculate_kv_scales and self.kv_cache_dtype == torch.float8_e4m3fn
        self._log_kv_cache_scales()

    # -- start-up ---------------------------------------------------------------------------------
    def _load_model(self, mc: Optional[ModelConfig] = None) -> torch.nn.Module:
        """The target model (`mc` None) or the draft model of speculative decoding (its ModelConfig)."""
        mc = mc or self.config.model
        model_class = get_model_class(mc.architecture)
        max_position = max(mc.max_model_len, 1)
        options = {}
        if is_moe_model(model_class):
            # NOTE: only the target's experts are expert-parallel; a draft's are split like a dense
            # model's (SpeculativeConfig.resolve_draft checks that split)
            options["moe_options"] = MoeOptions(enable_expert_parallel=(
                mc is self.config.model and self.config.parallel.enable_expert_parallel))
        with torch.device(self.device):
            model = model_class(mc.hf_config, max_position, self.dtype, mc.quantization, **options)
        if mc.load_format == "dummy":
            generator = torch.Generator(device=self.device)
            generator.manual_seed(mc.seed)
            init_dummy_weights(model, generator)
        else:
            from ..model_loader.weights import iterate_weights

            model.load_weights(iterate_weights(mc.source))
        model.eval()
        return model

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The cache's element type: the model dtype, or float8_e4m3fn (`--kv-cache-dtype fp8`)."""
        return self.config.cache.kv_cache_dtype or self.dtype

    def kv_bytes_per_block(self) -> int:
        # FP8: one byte an element, twice the blocks of bf16 in the same bytes
        target = paged_kv_cache.kv_bytes_per_block(self.model, self.block_size, self.kv_cache_dtype)
        return target + (self.drafter.kv_bytes_per_block() if self.drafter is not None else 0)

    def determine_num_blocks(self) -> int:
        """Blocks that fit the KV budget: explicit bytes, 1 GiB on CPU, or profiled on GPU."""
        cache = self.config.cache
        if cache.kv_cache_memory_bytes is not None:
            return int(cache.kv_cache_memory_bytes // self.kv_bytes_per_block())
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BYTES // self.kv_bytes_per_block()
        return self._profile_num_blocks()

    @torch.inference_mode()
    def _profile_num_blocks(self) -> int:
        """Runs a dummy max-size step and gives the KV cache what `gpu_memory_utilization` leaves."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.scheduler.max_num_batched_tokens
        seq_len = min(self.config.model.max_model_len, num_tokens)
        num_seqs = max(1, num_tokens // seq_len)
        num_blocks = num_seqs * -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_blocks)
        kv_temp_bytes = paged_kv_cache.cache_bytes(self.kv_cache)
        kv_temp_bytes += self.drafter.kv_cache_bytes() if self.drafter is not None else 0
        tokens = num_seqs * seq_len
        blocks_per_seq = -(-seq_len // self.block_size)
        metadata = AttentionMetadata(
            slot_mapping=torch.arange(tokens, device=self.device, dtype=torch.int64),
            query_start_loc=torch.arange(0, tokens + 1, seq_len, device=self.device, dtype=torch.int32),
            seq_lens=torch.full((num_seqs,), seq_len, device=self.device, dtype=torch.int32),
            block_tables=torch.arange(num_blocks, device=self.device, dtype=torch.int32).view(num_seqs, blocks_per_seq),
            max_query_len=seq_len, max_seq_len=seq_len)
        input_ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        hidden = self.model(input_ids, positions, metadata)
        self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs:])
        if self.drafter is not None:
            self.drafter.profile_forward(input_ids, positions, metadata, self.config.scheduler.max_num_seqs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - kv_temp_bytes
        self.kv_cache = None
        paged_kv_cache.release_kv_cache(self.model)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.cache.gpu_memory_utilization - peak - max(used_by_others, 0)
        logger.info("profiled peak %.2f GiB (excluding KV); KV budget %.2f GiB", peak / 2**30, budget / 2**30)
        startup_timeline.mark("KV-cache profiling")
        return int(max(budget, 0) // self.kv_bytes_per_block())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = paged_kv_cache.allocate_kv_cache(self.model, num_blocks, self.block_size,
                                                         self.kv_cache_dtype, self.device)
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num_blocks)

    def _check_kv_cache_dtype(self) -> None:
        if self.kv_cache_dtype != torch.float8_e4m3fn or self.device.type != "cuda":
            return
        capability = torch.cuda.get_device_capability(self.device)
        if capability < (8, 9):
            # NOTE: the Triton kernels convert e4m3 in hardware, which Ada (8.9) and Hopper (9.0) have
            raise ValueError(f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or newer (Ada, "
                             f"Hopper); this one is {capability[0]}.{capability[1]}: use kv_cache_dtype='auto'")

    def _log_kv_cache_scales(self) -> None:
        layers = self.model.attention_layers()
        from_checkpoint = any(layer.kv_scales_from_checkpoint for layer in layers)
        if self.kv_cache_dtype != torch.float8_e4m3fn:
            if from_checkpoint:
                logger.info("the checkpoint's KV-cache scales are unused: the KV cache is %s", self.kv_cache_dtype)
            return
        if self._kv_scales_pending:
            source = "calibrated on the first step (--calculate-kv-scales)"
        elif from_checkpoint:
            source = "from the checkpoint"
        else:
            source = "1.0 (none in the checkpoint; --calculate-kv-scales calibrates them)"
            scheme = getattr(self.config.model.quantization, "kv_cache_scheme", None)
            if scheme is not None:
                logger.warning("the checkpoint declares a kv_cache_scheme but carries no k_scale / v_scale tensors")
        logger.info("FP8 KV cache (float8_e4m3fn); per-layer scales %s", source)

    def _forward_setting_kv_scales(self, inputs: StepInputs) -> torch.Tensor:
        """The first step with real tokens, eager (never a graph replay, whose kernels would skip the
        layers' Python): each layer sets its scales from this step's K / V before writing them to
        the cache. The scales are fixed from then on (in place: captured graphs read them)."""
        layers = self.model.attention_layers()
        for layer in layers:
            layer.calculate_kv_scales = True
        try:
            return self.model(inputs.input_ids, inputs.positions, inputs.metadata)
        finally:
            for layer in layers:
                layer.calculate_kv_scales = False
            self._kv_scales_pending = False

    def capture_cuda_graphs(self) -> Optional[StepCosts]:
        """Decode graphs for padded batch sizes up to min(max_num_seqs, 512) (CUDA, not enforce_eager);
        with speculative decoding, verification graphs too (verify_graphs.py says which batches), and
        where the engine measures where speculation stops paying, their costs against the decode
        graphs' (returned; None otherwise). Every TP rank replays the same graphs in the same order."""
        if self.drafter is not None:
            self.drafter.capture_graphs()    # its own (it checks the same conditions)
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        from pagoda.kernels.backend import use_triton

        if not use_triton(self.kv_cache):
            return None     # the torch reference attention has data-dependent shapes
        from .cuda_graphs import DecodeGraphs

        max_model_len = self.config.model.max_model_len
        self.graphs = DecodeGraphs(
            self.model, max_batch=min(self.config.scheduler.max_num_seqs, 512),
            max_blocks_per_seq=-(-max_model_len // self.block_size), max_model_len=max_model_len,
            hidden_size=self.config.model.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        self.graphs.capture()
        if self.config.speculative is not None:
            from .verify_graphs import VerifyGraphs

            self.verify_graphs = VerifyGraphs.for_target(self.model, self.config, pool=self.graphs.pool)
            self.verify_graphs.capture()
            if self.config.speculative.measured_cutoff:
                from .verify_graphs import measure_step_costs

                return measure_step_costs(self.graphs, self.verify_graphs, self.kv_cache.shape[2], self.block_size)
        return None

    # -- one step ----------------------------------------------------------------------------------
    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for request_id in scheduler_output.finished_request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                self.block_table.free_row(state.row)
        for data in scheduler_output.new_requests:
            params = data.sampling_params
            self.requests[data.request_id] = CachedRequestState(
                data, row=self.block_table.add_row(), output_token_ids=list(data.output_token_ids),
                plain_greedy=(params.is_greedy and params.logprobs is None and not params.needs_penalties
                              and not params.logit_bias and params.min_tokens == 0
                              and params.structured_outputs is None))
        for item in scheduler_output.scheduled:
            self.block_table.append(self.requests[item.request_id].row, item.new_block_ids)
        if self.drafter is not None:
            self.drafter.update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """The flattened batch as device tensors; vectorised over requests (see step_inputs.py).

        Invariant: `logits_indices` lists, request by request in scheduled order, its prompt-logprob
        rows (`prompt_rows`) and then its sampled row; `_launch_sampling` walks the same order.
        """
        block_size = self.block_size
        scheduled = scheduler_output.scheduled
        states = [self.requests[item.request_id] for item in scheduled]
        num_seqs = len(scheduled)
        num_new = np.fromiter((len(item.token_ids) for item in scheduled), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((item.num_computed_tokens for item in scheduled), dtype=np.int64, count=num_seqs)
        rows = np.fromiter((state.row for state in states), dtype=np.int64, count=num_seqs)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        if num_tokens == num_seqs:                     # pure decode: one token per sequence
            seq_of_token = np.arange(num_seqs)
            positions = starts
        else:
            seq_of_token = np.repeat(np.arange(num_seqs), num_new)
            positions = starts[seq_of_token] + (np.arange(num_tokens) - query_start_loc[:-1][seq_of_token])
        table = self.block_table.table
        slot_mapping = table[rows[seq_of_token], positions // block_size].astype(np.int64) * block_size \
            + positions % block_size
        seq_lens = starts + num_new
        max_seq_len = int(seq_lens.max())
        block_tables = table[rows, : -(-max_seq_len // block_size)]
        input_ids = np.fromiter((t for item in scheduled for t in item.token_ids), dtype=np.int64, count=num_tokens)
        # -1 marks a token the previous step sampled on the device (async scheduling): gather it there
        dst = src = None
        if (input_ids < 0).any():
            dst = np.nonzero(input_ids < 0)[0]                    # rows of input_ids
            src = np.fromiter((self.prev_rows[scheduled[i].request_id] for i in seq_of_token[dst]),
                              dtype=np.int64, count=dst.size)    # rows of the last step's sampled ids
            input_ids[dst] = 0

        # rows of the hidden states that feed the LM head, in the order _launch_sampling reads them
        prompt_rows: dict[str, PromptRows] = {}
        sample_mask = np.fromiter((item.sample for item in scheduled), dtype=bool, count=num_seqs)
        if any(state.data.sampling_params.prompt_logprobs is not None for state in states):
            logits_indices: list[int] = []
            for i, (item, state) in enumerate(zip(scheduled, states)):
                cursor, start = int(query_start_loc[i]), item.num_computed_tokens
                prompt_len = len(state.data.prompt_token_ids)
                if state.data.sampling_params.prompt_logprobs is not None and start < prompt_len:
                    count = max(0, min(start + len(item.token_ids), prompt_len - 1) - start)
                    prompt_rows[item.request_id] = PromptRows(len(logits_indices), count, start)
                    logits_indices.extend(range(cursor, cursor + count))
                if item.sample:
                    end = int(query_start_loc[i + 1])
                    logits_indices.extend(range(end - 1 - item.num_spec_tokens, end))
            indices = np.asarray(logits_indices, dtype=np.int64)
        elif scheduler_output.num_spec_tokens:
            # each sampling request's last 1 + num_spec_tokens rows (SamplingLayout's order)
            counts = sample_mask * (1 + np.fromiter((item.num_spec_tokens for item in scheduled), dtype=np.int64,
                                                    count=num_seqs))
            firsts = np.cumsum(counts) - counts
            indices = (np.repeat(query_start_loc[1:] - counts, counts)
                       + np.arange(int(counts.sum())) - np.repeat(firsts, counts))
        else:
            indices = (query_start_loc[1:] - 1)[sample_mask]

        self.staging.begin_step()
        stage = self.staging.to_device
        placeholders = None
        if dst is not None:
            placeholders = Placeholders(stage("placeholder_dst", dst, torch.int64),
                                        stage("placeholder_src", src, torch.int64))
        metadata = AttentionMetadata(
            slot_mapping=stage("slot_mapping", slot_mapping, torch.int64),
            query_start_loc=stage("query_start_loc", query_start_loc, torch.int32),
            seq_lens=stage("seq_lens", seq_lens, torch.int32),
            block_tables=stage("block_tables", block_tables, torch.int32),
            max_query_len=int(num_new.max()),
            max_seq_len=max_seq_len,
        )
        inputs = StepInputs(
            input_ids=stage("input_ids", input_ids, torch.int64),
            positions=stage("positions", positions, torch.int64),
            metadata=metadata,
            logits_indices=stage("logits_indices", indices, torch.int64),
            prompt_rows=prompt_rows,
            placeholders=placeholders,
        )
        self.staging.end_step()
        return inputs

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        handle = self.execute_model_async(scheduler_output)
        return handle.result() if handle is not None else None

    @torch.inference_mode()
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Optional[StepHandle]:
        """Launches the forward pass and sampling; the returned handle's `result()` waits for the
        sampled tokens (None on non-driver TP ranks, which do not sample). A step with
        `structured_request_ids` launches the forward pass only and returns None: `sample_tokens`
        samples it once the engine sends the bitmask."""
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return StepHandle.done(ModelRunnerOutput()) if self.is_driver else None
        if self.profiler is not None:
            self.profiler.before_step()
        if self._unresolved is not None and any(
                self.requests[item.request_id].data.sampling_params.needs_penalties
                for item in scheduler_output.scheduled):
            self._unresolved.result()      # penalties count every earlier token: wait for them on the host
        inputs = self._prepare_inputs(scheduler_output)
        if inputs.placeholders is not None:
            inputs.input_ids[inputs.placeholders.dst] = self.prev_sampled[inputs.placeholders.src]
        if self.drafter is not None:
            self.drafter.propose(scheduler_output, inputs)    # the draft model's drafts into input_ids
        if self._kv_scales_pending:
            hidden = self._forward_setting_kv_scales(inputs)                                 # (T, hidden)
        elif self.graphs is not None and self.graphs.can_run(inputs.metadata):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.metadata)   # (T, hidden)
        elif self.verify_graphs is not None and self.verify_graphs.can_run(inputs.metadata, scheduler_output.scheduled):
            hidden = self.verify_graphs.run(inputs.input_ids, inputs.positions, inputs.metadata)  # (T, hidden)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.metadata)         # (T, hidden)
        logits_indices, prompt_rows = inputs.logits_indices, inputs.prompt_rows
        if get_tp_size() > 1 and not prompt_rows and all(
                self.requests[item.request_id].plain_greedy for item in scheduler_output.scheduled if item.sample):
            # NOTE: every rank takes this branch alike (the same requests, flags and prompt rows):
            # argmax over the vocabulary shards, no logits gathered; every rank gets the same ids
            layout = SamplingLayout.of(scheduler_output.scheduled)
            sampled = self.model.greedy_tokens(hidden[logits_indices]) if layout.num_rows else None   # (rows,)
            if not self.is_driver:
                if layout.num_rows:
                    self.prev_sampled, self.prev_rows = sampled, layout.plain_rows()
                return None
            handle = self._launch_sampling(scheduler_output, None, prompt_rows, greedy_sampled=sampled)
            self._unresolved = handle
            return handle
        if get_tp_size() > 1 and not self.is_driver:
            # non-driver ranks still join the LM head's all-gather
            self.model.compute_logits(hidden[logits_indices])
            if self._shares_sampled_ids:
                # the next step's placeholders read these on every rank (see _launch_sampling)
                layout = SamplingLayout.of(scheduler_output.scheduled)
                if layout.num_rows:
                    sampled = torch.empty(layout.num_rows, dtype=torch.int64, device=self.device)
                    self.prev_sampled = tp_broadcast(sampled, src=0)
                    self.prev_rows = layout.plain_rows()
            return None
        logits = self.model.compute_logits(hidden[logits_indices])           # (rows, vocab)
        if scheduler_output.structured_request_ids:
            self._awaiting_mask = (scheduler_output, logits, prompt_rows)
            return None
        handle = self._launch_sampling(scheduler_output, logits, prompt_rows)
        self._unresolved = handle
        return handle

    @torch.inference_mode()
    def sample_tokens(self, grammar_output: GrammarOutput) -> StepHandle:
        """Samples the step launched last, whose constrained rows get `grammar_output`'s bitmask."""
        assert self._awaiting_mask is not None, "sample_tokens without a step waiting for its mask"
        scheduler_output, logits, prompt_rows = self._awaiting_mask
        self._awaiting_mask = None
        assert grammar_output.request_ids == scheduler_output.structured_request_ids, "mask of another step"
        handle = self._launch_sampling(scheduler_output, logits, prompt_rows, grammar_output=grammar_output)
        self._unresolved = handle
        return handle

    def _launch_sampling(self, scheduler_output: SchedulerOutput, logits: Optional[torch.Tensor],
                         prompt_rows: dict[str, PromptRows],
                         greedy_sampled: Optional[torch.Tensor] = None,
                         grammar_output: Optional[GrammarOutput] = None) -> StepHandle:
        """greedy_sampled: the rows' argmax ids, already taken on every TP rank (then logits is None);
        grammar_output: the bitmask of the constrained rows."""
        layout = SamplingLayout.of(scheduler_output.scheduled)
        drafts = self._verified_drafts(scheduler_output)
        row_index: list[int] = []          # row of `logits` for each sampling row
        cursor = 0
        for item in scheduler_output.scheduled:
            if item.request_id in prompt_rows:
                cursor += prompt_rows[item.request_id].num_rows
            if item.sample:
                row_index.extend(range(cursor, cursor + 1 + item.num_spec_tokens))
                cursor += 1 + item.num_spec_tokens
        rows: Optional[list[SamplingRow]] = None
        sampled = raw_logprobs = host = event = None
        if layout.num_rows:
            if greedy_sampled is not None:
                sampled = greedy_sampled
            else:
                assert logits is not None
                sample_logits = logits if len(row_index) == logits.shape[0] else logits[row_index]
                states = [self.requests[r] for r in layout.request_ids]
                if all(state.plain_greedy for state in states):
                    sampled = sample_logits.argmax(dim=-1)        # greedy without extras: one argmax
                else:
                    items = {item.request_id: item for item in scheduler_output.scheduled}
                    rows = [row for r, state in zip(layout.request_ids, states)
                            for row in self._sampling_rows(state, items[r], drafts)]
                    mask = self._token_mask(grammar_output, layout) if grammar_output is not None else None
                    sampled, raw_logprobs = self.sampler.sample(sample_logits, rows, mask)
            if self._shares_sampled_ids and greedy_sampled is None:
                # NOTE: async scheduling under TP: the next step's input ids come from this step's
                # samples on every rank, so rank 0 broadcasts them (on the device, no host sync)
                sampled = tp_broadcast(sampled.to(torch.int64).contiguous(), src=0)
            self.prev_sampled, self.prev_rows = sampled, layout.plain_rows()
            if self.device.type == "cuda":
                self._host_slot ^= 1
                host = self._host_tokens[self._host_slot][: layout.num_rows]
                host.copy_(sampled, non_blocking=True)
                event = torch.cuda.Event()
                event.record()

        def resolve() -> ModelRunnerOutput:
            out = ModelRunnerOutput()
            if layout.num_rows:
                if event is not None:
                    event.synchronize()
                    tokens = host.tolist()
                else:
                    tokens = sampled.tolist()
                entries = (self.sampler.to_output(sampled, raw_logprobs, rows, tokens).logprobs
                           if rows is not None else [None] * len(tokens))
                for request_id, first, num_spec in layout:
                    if num_spec:
                        # the target's samples at [last, d1 .. dK]: keep the drafts they confirm and
                        # the sample after the last of them
                        targets = tokens[first:first + 1 + num_spec]
                        emitted = targets[:accepted_prefix(drafts[request_id], targets) + 1]
                        out.spec_token_ids[request_id] = emitted
                        if entries[first] is not None:
                            out.spec_logprobs[request_id] = entries[first:first + len(emitted)]
                    else:
                        emitted = [tokens[first]]
                        out.sampled_token_ids[request_id] = emitted[0]
                        if entries[first] is not None:
                            out.logprobs[request_id] = entries[first]
                    state = self.requests.get(request_id)
                    if state is not None:          # (dropped if it finished while this step ran)
                        state.output_token_ids.extend(emitted)
            if prompt_rows:
                out.prompt_logprobs = prompt_logprobs(logits, prompt_rows, self.requests)
            return out

        return StepHandle(resolve)

    def _token_mask(self, grammar_output: GrammarOutput, layout: SamplingLayout) -> TokenMask:
        """The bitmask on the device, and the sampling row each of its rows constrains (a constrained
        request never verifies drafts: one row each)."""
        row_of = dict(zip(layout.request_ids, layout.first_rows))
        rows = np.fromiter((row_of[r] for r in grammar_output.request_ids), dtype=np.int64,
                           count=len(grammar_output.request_ids))
        # staged through the step's pinned buffers (no per-step pinned allocation), copied without a sync;
        # the set's event is recorded again so that it covers these copies too
        mask = TokenMask(self.staging.to_device("grammar_bitmask", grammar_output.bitmask, torch.int32),
                         self.staging.to_device("grammar_rows", rows, torch.int64))
        self.staging.end_step()
        return mask

    def _verified_drafts(self, scheduler_output: SchedulerOutput) -> Mapping[str, list[int]]:
        """request id -> the drafts its chunk verifies: the scheduled ones, or the draft model's."""
        if not scheduler_output.num_spec_tokens:
            return {}
        if self.drafter is not None:
            return self.drafter.drafts_of(scheduler_output)
        return {item.request_id: item.token_ids[-item.num_spec_tokens:]
                for item in scheduler_output.scheduled if item.num_spec_tokens}

    @staticmethod
    def _sampling_rows(state: CachedRequestState, item: ScheduledRequest,
                       verified: Mapping[str, list[int]]) -> list[SamplingRow]:
        """One row per sampled position: the last token's, then one per draft (its position's
        seed, min_tokens and penalties, which count the drafts before it as output)."""
        params = state.data.sampling_params
        # position of the token being sampled, from the schedule (the host may not know the
        # previous token yet): seeds and min_tokens depend on it, never on what arrived
        num_spec = item.num_spec_tokens
        first_out = item.num_computed_tokens + len(item.token_ids) - num_spec - len(state.data.prompt_token_ids)
        penalties = params.needs_penalties
        drafts = verified[item.request_id] if penalties and num_spec else []    # (a draft model's: a wait)
        rows = []
        for j in range(1 + num_spec):
            num_out = first_out + j
            output_ids = None
            if penalties:
                output_ids = state.output_token_ids + drafts[:j] if j else state.output_token_ids
            rows.append(SamplingRow(
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                seed=state.data.seed, num_output_tokens=num_out,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                prompt_token_ids=state.data.prompt_token_ids if penalties else None,
                output_token_ids=output_ids,
                logit_bias=params.logit_bias,
                banned_token_ids=state.data.min_tokens_banned_ids if num_out < params.min_tokens else [],
                num_logprobs=params.logprobs,
            ))
        return rows
