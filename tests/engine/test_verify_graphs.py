"""Verification steps in the uniform layout of the CUDA graphs (engine/worker/verify_graphs.py): every
sequence front-padded to q = 1 + K rows gives, at its real rows, the hidden states of the unpadded
eager forward, and writes exactly the cache slots the eager forward writes.

On the CPU the uniform batch is run eagerly (no capture): the packing, the padding sequences of a
bucket larger than the batch and the gather back are the code a replay uses. The CUDA test captures
and replays real graphs (skipped without a GPU).
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import assert_pool_whole, greedy
from pagoda.engine.models.registry import get_model_class
from pagoda.engine.step import ScheduledRequest
from pagoda.engine.worker.verify_graphs import (VERIFY_GRAPH_MAX_BATCH, UniformBatch, VerifyGraphs,
                                                min_context_len, padded_rows, verify_max_batch)
from pagoda.kernels.backend import use_backend
from pagoda.kernels.metadata import AttentionMetadata

BLOCK_SIZE = 4
NUM_BLOCKS = 40
MAX_MODEL_LEN = 64
MAX_BLOCKS = MAX_MODEL_LEN // BLOCK_SIZE


def tiny_model(device: torch.device, sliding_window: int | None = None) -> torch.nn.Module:
    """A 2-layer GQA llama (mistral with a window) of random fp32 weights large enough to matter."""
    if sliding_window is None:
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=MAX_MODEL_LEN)
        name = "LlamaForCausalLM"
    else:
        config = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            max_position_embeddings=MAX_MODEL_LEN, sliding_window=sliding_window)
        name = "MistralForCausalLM"
    with torch.device(device):
        model = get_model_class(name)(config, MAX_MODEL_LEN, torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    for param_name, param in model.named_parameters():
        if "norm" in param_name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.3, generator=generator)
    model.eval()
    return model


def random_cache(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    layer = model.attention_layers()[0]
    generator = torch.Generator(device=device).manual_seed(1)
    return torch.randn(len(model.attention_layers()), 2, NUM_BLOCKS, BLOCK_SIZE, layer.num_kv_heads, layer.head_dim,
                       generator=generator, device=device)


def use_cache(model: torch.nn.Module, cache: torch.Tensor) -> None:
    for i, layer in enumerate(model.attention_layers()):
        layer.kv_cache = cache[i]


def make_step(cached: list[int], new: list[int], device: torch.device, seed: int = 0):
    """A step of sequences with `cached[i]` tokens in the cache and `new[i]` new ones: (input_ids,
    positions, metadata) as the runner builds them, each sequence on blocks of its own."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(NUM_BLOCKS, generator=generator)
    tables = torch.zeros(len(cached), MAX_BLOCKS, dtype=torch.int32)
    ids, positions, slots, qsl = [], [], [], [0]
    next_block = 0
    for i, (c, n) in enumerate(zip(cached, new)):
        blocks = -(-(c + n) // BLOCK_SIZE)
        tables[i, :blocks] = order[next_block:next_block + blocks]
        next_block += blocks
        for p in range(c, c + n):
            ids.append(int(torch.randint(3, 96, (1,), generator=generator)))
            positions.append(p)
            slots.append(int(tables[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE)
        qsl.append(qsl[-1] + n)
    seq_lens = [c + n for c, n in zip(cached, new)]
    width = -(-max(seq_lens) // BLOCK_SIZE)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables[:, :width].contiguous().to(device),
        max_query_len=max(new), max_seq_len=max(seq_lens))
    return (torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device), metadata)


def scheduled(cached: list[int], new: list[int]) -> list[ScheduledRequest]:
    return [ScheduledRequest(f"r{i}", [5] * n, c, [], True, n - 1) for i, (c, n) in enumerate(zip(cached, new))]


# -- the layout -------------------------------------------------------------------------------------

def test_padded_rows_put_each_chunk_at_the_end_of_its_q_rows():
    qsl = torch.tensor([0, 3, 4, 6], dtype=torch.int32)           # chunks of 3, 1 and 2 tokens
    assert padded_rows(qsl, 6, 4).tolist() == [1, 2, 3, 7, 10, 11]
    assert padded_rows(torch.tensor([0, 1, 2], dtype=torch.int32), 2, 1).tolist() == [0, 1]   # q = 1: identity


def test_pack_fills_positions_slots_lengths_and_tables():
    q, cached, new = 4, [9, 5, 12], [4, 1, 2]
    ids, positions, metadata = make_step(cached, new, torch.device("cpu"))
    batch = UniformBatch(q, max_batch=8, max_blocks_per_seq=MAX_BLOCKS, device=torch.device("cpu"))
    dest = batch.pack(ids, positions, metadata, batch=4)
    assert dest.tolist() == [0, 1, 2, 3, 7, 10, 11]
    rows = 4 * q
    # every row j of sequence i at seq_len - q + j; the padding sequence (seq_len q) at 0 .. q - 1
    assert batch.positions[:rows].tolist() == [9, 10, 11, 12, 2, 3, 4, 5, 10, 11, 12, 13, 0, 1, 2, 3]
    assert batch.positions[dest].tolist() == positions.tolist()
    slots = batch.slot_mapping[:rows]
    assert slots[dest].tolist() == metadata.slot_mapping.tolist()
    padding = torch.ones(rows, dtype=torch.bool)
    padding[dest] = False
    assert (slots[padding] == -1).all() and int(padding.sum()) == rows - len(dest)
    assert batch.input_ids[dest].tolist() == ids.tolist()
    assert batch.seq_lens[:4].tolist() == [13, 6, 14, q]
    assert batch.query_start_loc[:5].tolist() == [0, 4, 8, 12, 16]
    width = metadata.block_tables.shape[1]
    assert torch.equal(batch.block_tables[:3, :width], metadata.block_tables)
    meta = batch.metadata(4, MAX_MODEL_LEN)
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs) == (q, MAX_MODEL_LEN, 4)
    assert meta.slot_mapping.shape[0] == rows


def test_which_steps_fit():
    q = 4
    batch = UniformBatch(q, max_batch=8, max_blocks_per_seq=MAX_BLOCKS, device=torch.device("cpu"))
    _, _, metadata = make_step([9, 5], [4, 1], torch.device("cpu"))
    assert batch.fits(metadata, min_seq_len=q + 1)
    # a context of q tokens or fewer: eager (a seq_len == q chunk would look like a whole new prompt)
    assert not batch.fits(metadata, min_seq_len=q)
    assert not batch.fits(metadata, min_seq_len=2)
    _, _, longer = make_step([9, 5], [5, 1], torch.device("cpu"))     # a chunk of q + 1 tokens: eager
    assert not batch.fits(longer, min_seq_len=10)
    _, _, many = make_step([5] * 9, [1] * 9, torch.device("cpu"))    # more sequences than the largest bucket
    assert not batch.fits(many, min_seq_len=6)
    assert min_context_len(scheduled([9, 5, 3], [4, 1, 2])) == 5
    graphs = VerifyGraphs(None, q=q, max_batch=8, max_blocks_per_seq=MAX_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          hidden_size=8, dtype=torch.float32, device=torch.device("cpu"))
    assert graphs.can_run(metadata, scheduled([9, 5], [4, 1]))
    assert not graphs.can_run(metadata, scheduled([9, 2], [4, 1]))           # a context of 3 <= q tokens
    assert not graphs.can_run(longer, scheduled([9, 5], [5, 1]))
    assert min_context_len([]) == 0


def test_verify_max_batch():
    assert verify_max_batch(16, 256) == 15             # speculation stops at 16 running requests
    assert verify_max_batch(None, 256) == VERIFY_GRAPH_MAX_BATCH
    assert verify_max_batch(None, 8) == 8
    assert verify_max_batch(2, 256) == 1
    # a measured cutoff: graphs wherever the measurement may find that speculation pays
    assert verify_max_batch(16, 256, measured_cutoff=True) == VERIFY_GRAPH_MAX_BATCH
    assert verify_max_batch(16, 40, measured_cutoff=True) == 40


# -- padded forward == unpadded eager forward -------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "triton"], ids=["cpu-kernels", "triton-interpreted"])
@pytest.mark.parametrize("sliding_window", [None, 3], ids=["full", "window3"])
def test_padded_forward_equals_eager_at_the_real_rows(sliding_window, backend):
    """Mixed chunk lengths 1 .. q, a context of exactly q + 1, a bucket larger than the batch; then a
    smaller step into the same buffers (stale padding rows and block-table rows from the first). On
    the CPU kernels, and on the Triton ones (interpreted: the kernels a replay runs)."""
    with use_backend(backend):
        check_padded_forward(sliding_window)


def check_padded_forward(sliding_window: int | None) -> None:
    cpu = torch.device("cpu")
    model = tiny_model(cpu, sliding_window)
    q = 4
    batch = UniformBatch(q, max_batch=8, max_blocks_per_seq=MAX_BLOCKS, device=cpu)
    original = random_cache(model, cpu)
    steps = [([9, 5, 12, 4, 4], [4, 1, 2, 3, 1], 8), ([6, 20, 7], [2, 4, 1], 4)]
    for seed, (cached, new, bucket) in enumerate(steps):
        ids, positions, metadata = make_step(cached, new, cpu, seed=seed)
        assert batch.fits(metadata, min(c + n for c, n in zip(cached, new)))
        eager_cache, padded_cache = original.clone(), original.clone()
        with torch.inference_mode():
            use_cache(model, eager_cache)
            want = model(ids, positions, metadata)                                   # (T, hidden)
            use_cache(model, padded_cache)
            dest = batch.pack(ids, positions, metadata, bucket)
            rows = bucket * q
            out = model(batch.input_ids[:rows], batch.positions[:rows], batch.metadata(bucket, MAX_MODEL_LEN))
        got = out.index_select(0, dest)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        # the same slots written with the same K / V; every other slot untouched (padding writes nothing)
        flat = lambda c: c.view(c.shape[0], 2, NUM_BLOCKS * BLOCK_SIZE, -1)      # noqa: E731
        written = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
        written[metadata.slot_mapping] = True
        assert torch.equal(flat(padded_cache)[:, :, ~written], flat(original)[:, :, ~written])
        torch.testing.assert_close(flat(padded_cache)[:, :, written], flat(eager_cache)[:, :, written],
                                   atol=1e-5, rtol=1e-5)
        assert not torch.equal(flat(padded_cache)[:, :, written], flat(original)[:, :, written])


def test_padding_rows_do_not_leak_into_real_rows():
    """Oracle check: the same step with other ids in the padding rows gives the same real rows, and the
    real rows depend on their cached context (a changed context slot changes them)."""
    cpu = torch.device("cpu")
    model = tiny_model(cpu)
    q = 4
    batch = UniformBatch(q, max_batch=4, max_blocks_per_seq=MAX_BLOCKS, device=cpu)
    ids, positions, metadata = make_step([9, 6], [1, 3], cpu)
    cache = random_cache(model, cpu)
    use_cache(model, cache)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            dest = batch.pack(ids, positions, metadata, 2)
            out = model(batch.input_ids[:8], batch.positions[:8], batch.metadata(2, MAX_MODEL_LEN))
            return out.index_select(0, dest)

    first = forward()
    batch.input_ids.fill_(7)                     # other padding ids (pack rewrites the real rows only)
    torch.testing.assert_close(forward(), first, atol=0, rtol=0)
    table = metadata.block_tables[0]
    cache[:, :, int(table[0]), 2] += 1.0         # position 2 of sequence 0: its context, not its new token
    changed = forward()
    assert not torch.allclose(changed[0], first[0])
    torch.testing.assert_close(changed[1:], first[1:], atol=0, rtol=0)


# -- the runner takes the graph branch ---------------------------------------------------------------

class EagerVerifyGraphs(VerifyGraphs):
    """The runner's verification-graph path with the replay run eagerly (CPU): counts its steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replays: list[tuple[int, int, int]] = []      # (bucket, real sequences, max_query_len)
        self._step: tuple[int, int] = (0, 0)

    def run(self, input_ids, positions, metadata):
        self._step = (metadata.num_seqs, metadata.max_query_len)
        return super().run(input_ids, positions, metadata)

    def _replay(self, batch: int) -> None:
        self.replays.append((batch, *self._step))
        with torch.inference_mode():
            self._forward(batch)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_runner_on_the_verification_path_gives_the_plain_tokens(make_llm, async_scheduling):
    from test_spec_decode import SPEC, generate, repeating_prompts, token_ids

    plain = make_llm(async_scheduling=async_scheduling)
    spec = make_llm(async_scheduling=async_scheduling, speculative_config=SPEC)
    runner = spec.engine.core.executor.runner
    graphs = EagerVerifyGraphs.for_target(runner.model, runner.config)
    assert graphs.q == 1 + json.loads(SPEC)["num_speculative_tokens"]
    assert graphs.buckets[-1] == min(VERIFY_GRAPH_MAX_BATCH, runner.config.scheduler.max_num_seqs)   # no limit
    with pytest.raises(ValueError, match="speculative_config"):
        VerifyGraphs.for_target(runner.model, plain.engine.core.executor.runner.config)
    prompts = repeating_prompts(6, seed=4)
    runner.verify_graphs = graphs
    try:
        got = generate(spec, prompts, greedy(28))
    finally:
        runner.verify_graphs = None
    assert token_ids(got) == token_ids(generate(plain, prompts, greedy(28)))
    # (with no decode graphs on the CPU, plain decode steps take this path too)
    verifying = [(bucket, num_seqs) for bucket, num_seqs, max_query_len in graphs.replays if max_query_len > 1]
    assert len(verifying) > 10
    assert any(bucket > num_seqs for bucket, num_seqs in verifying)      # padding sequences ran
    assert_pool_whole(spec)


# -- CUDA: capture and replay ------------------------------------------------------------------------

@pytest.fixture
def cuda_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny model on CUDA with a random KV cache in place: (model, cache)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_model(torch.device("cuda"))
    cache = random_cache(model, torch.device("cuda"))
    use_cache(model, cache)
    return model, cache


def test_captured_graph_replays_the_eager_forward(cuda_model):
    cuda = torch.device("cuda")
    model, cache = cuda_model
    q = 4
    graphs = VerifyGraphs(model, q=q, max_batch=8, max_blocks_per_seq=MAX_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          hidden_size=64, dtype=torch.float32, device=cuda)
    before = cache.clone()
    graphs.capture()
    assert torch.equal(cache, before), "capture wrote to the KV cache"
    assert sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8]
    for seed, (cached, new) in enumerate([([9, 5, 12, 4, 4], [4, 1, 2, 3, 1]), ([6, 20], [2, 4])]):
        ids, positions, metadata = make_step(cached, new, cuda, seed=seed)
        assert graphs.can_run(metadata, scheduled(cached, new))
        eager_cache = before.clone()
        with torch.inference_mode():
            use_cache(model, eager_cache)
            want = model(ids, positions, metadata)
            use_cache(model, cache)
            cache.copy_(before)
            got = graphs.run(ids, positions, metadata)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache, eager_cache, atol=1e-4, rtol=1e-4)


def test_step_costs_are_measured_and_the_graphs_left_as_captured(cuda_model):
    from pagoda.engine.worker.cuda_graphs import DecodeGraphs
    from pagoda.engine.worker.verify_graphs import measure_step_costs

    cuda = torch.device("cuda")
    model, cache = cuda_model
    decode = DecodeGraphs(model, max_batch=16, max_blocks_per_seq=MAX_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          hidden_size=64, dtype=torch.float32, device=cuda)
    decode.capture()
    verify = VerifyGraphs(model, q=4, max_batch=8, max_blocks_per_seq=MAX_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          hidden_size=64, dtype=torch.float32, device=cuda, pool=decode.pool)
    verify.capture()
    before = cache.clone()
    costs = measure_step_costs(decode, verify, NUM_BLOCKS, BLOCK_SIZE)
    assert costs.buckets == (1, 2, 4, 8) and all(t > 0 for t in costs.decode_s + costs.verify_s)
    assert 4 < costs.context <= MAX_MODEL_LEN
    assert torch.equal(cache, before), "timing wrote to the KV cache"
    assert (decode.seq_lens == 1).all() and (verify.batch.seq_lens == 4).all()
    assert not decode.block_tables.any() and not verify.batch.block_tables.any()


def test_step_cost_timing_sets_up_the_static_buffers_and_restores_them(monkeypatch):
    """`measure_step_costs` with stand-in graphs (CPU): each replay sees every sequence of its bucket at
    the timing context over valid blocks, nothing written (slots -1); afterwards the buffers hold the
    captured padding again, and each bucket's ratio is its verify time over its decode time."""
    from pagoda.engine.worker import verify_graphs as module
    from pagoda.engine.worker.cuda_graphs import DecodeGraphs

    cpu = torch.device("cpu")
    q, num_blocks = 3, 10
    decode = DecodeGraphs(None, max_batch=16, max_blocks_per_seq=MAX_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          hidden_size=8, dtype=torch.float32, device=cpu)
    verify = VerifyGraphs(None, q=q, max_batch=6, max_blocks_per_seq=MAX_BLOCKS, max_model_len=MAX_MODEL_LEN,
                          hidden_size=8, dtype=torch.float32, device=cpu)
    seen: list[tuple] = []
    clock = [0.0]

    class StandIn:
        def __init__(self, kind: str, batch: int, cost_ms: float) -> None:
            self.kind, self.batch, self.cost_ms = kind, batch, cost_ms

        def replay(self) -> None:
            buffers = decode if self.kind == "decode" else verify.batch
            rows = self.batch if self.kind == "decode" else self.batch * q
            seen.append((self.kind, self.batch, buffers.seq_lens[:self.batch].tolist(),
                         buffers.positions[:rows].tolist(), buffers.block_tables[:self.batch, :3].tolist(),
                         int(buffers.slot_mapping.max())))
            clock[0] += self.cost_ms

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.at = None

        def record(self) -> None:
            self.at = clock[0]

        def elapsed_time(self, end: "Event") -> float:
            return end.at - self.at

    decode.graphs = {b: StandIn("decode", b, 1.0 + b / 16) for b in decode.buckets}
    verify.graphs = {b: StandIn("verify", b, 1.2 + b / 4) for b in verify.buckets}
    monkeypatch.setattr(module.torch.cuda, "Event", Event)
    monkeypatch.setattr(module.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(module, "TIMING_CONTEXT", 40)
    costs = module.measure_step_costs(decode, verify, num_blocks, BLOCK_SIZE)

    assert verify.buckets == [1, 2, 4, 6] and costs.buckets == (1, 2, 4, 6) and costs.context == 40
    # bucket 6 verifies against the decode graph a plain step of 6 replays: bucket 8
    assert costs.decode_s == pytest.approx(tuple((1.0 + b / 16) / 1e3 for b in (1, 2, 4, 8)))
    assert costs.ratio(5) == pytest.approx((1.2 + 6 / 4) / (1.0 + 8 / 16))
    blocks = [b % num_blocks for b in range(3)]
    for kind, batch, seq_lens, positions, tables, slots in seen:
        assert seq_lens == [40] * batch and tables == [blocks] * batch and slots == -1
        assert positions == ([39] * batch if kind == "decode" else [37, 38, 39] * batch)
    assert [(k, b) for k, b, *_ in seen][:4] == [("decode", 1), ("decode", 1), ("decode", 1), ("decode", 1)]
    assert len(seen) == 2 * 4 * (1 + module.TIMING_REPLAYS)
    assert (decode.seq_lens == 1).all() and not decode.positions.any() and not decode.block_tables.any()
    assert (verify.batch.seq_lens == q).all() and not verify.batch.positions.any()
    assert not verify.batch.block_tables.any()
