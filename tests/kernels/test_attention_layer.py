"""The PagedAttention layer's features against transformers' own attention code.

A short sequence runs through the layer as the engine runs it (a chunked prompt, then decode steps,
each writing its K/V into the layer's paged cache first) and every step's output is compared with
transformers' eager attention over the whole sequence: Gemma 2's (`softcap`) under its
sliding-window causal mask, and gpt-oss's (`sinks`, which the layer loads from a safetensors file
through its weight loader, as tensor-parallel rank 1 of 2 holding the second half of the heads).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from pagoda.engine.layers import attention as attention_layer
from pagoda.engine.layers.attention import PagedAttention
from pagoda.engine.model_loader.weights import SafetensorsWeight
from pagoda.kernels.backend import use_backend
from pagoda.kernels.metadata import AttentionMetadata

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 16, 8
STEPS = [12, 9, 1, 1, 1]                  # a prompt in two chunks, then three decode tokens: 24 tokens


def run_layer(layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cache_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (T, H, D), k / v (T, Hkv, D) fed in STEPS through a paged cache -> (T, H, D)."""
    total = q.shape[0]
    num_blocks = -(-total // BLOCK_SIZE) + 1
    layer.kv_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=cache_dtype)
    blocks = torch.randperm(num_blocks).int()                       # the sequence's blocks, any order
    outs, done = [], 0
    for step in STEPS:
        positions = torch.arange(done, done + step)
        metadata = AttentionMetadata(
            slot_mapping=(blocks[positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE),
            query_start_loc=torch.tensor([0, step], dtype=torch.int32),
            seq_lens=torch.tensor([done + step], dtype=torch.int32),
            block_tables=blocks[None].clone(), max_query_len=step, max_seq_len=done + step)
        rows = slice(done, done + step)
        outs.append(layer(q[rows], k[rows], v[rows], metadata))
        done += step
    return torch.cat(outs)


def transformers_mask(total: int, sliding_window) -> torch.Tensor:
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    fn = causal_mask_function if sliding_window is None else sliding_window_causal_mask_function(sliding_window)
    visible = fn(0, 0, torch.arange(total)[:, None], torch.arange(total)[None, :])
    return torch.zeros(total, total).masked_fill(~visible, float("-inf"))[None, None]     # additive (1, 1, T, T)


class _HFModule(nn.Module):
    """What transformers' eager attention functions read off their module."""

    def __init__(self, sinks=None):
        super().__init__()
        self.num_key_value_groups = NUM_HEADS // NUM_KV_HEADS
        self.head_dim = HEAD_DIM
        if sinks is not None:
            self.sinks = nn.Parameter(sinks)
        self.eval()


def random_qkv(total: int = sum(STEPS)):
    return (torch.randn(total, NUM_HEADS, HEAD_DIM), torch.randn(total, NUM_KV_HEADS, HEAD_DIM),
            torch.randn(total, NUM_KV_HEADS, HEAD_DIM))


def as_hf(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)[None]                                   # (T, H, D) -> (1, H, T, D)


@pytest.mark.parametrize("backend", ["auto", "triton"])          # the CPU path; Triton in the interpreter
@pytest.mark.parametrize("sliding_window", [5, 1000, None])
def test_gemma2_softcap_and_window_match_transformers(sliding_window, backend):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = random_qkv()
    scale, cap = HEAD_DIM ** -0.5, 1.5
    layer = PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, scale, sliding_window=sliding_window,
                           logit_softcap=cap)
    with use_backend(backend):
        out = run_layer(layer, q * 3, k, v)                         # * 3: scores well into the tanh's bend
    expected, _ = eager_attention_forward(_HFModule(), as_hf(q * 3), as_hf(k), as_hf(v),
                                          transformers_mask(q.shape[0], sliding_window), scaling=scale, softcap=cap)
    torch.testing.assert_close(out, expected[0], atol=1e-4, rtol=1e-4)
    plain = run_layer(PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, scale), q * 3, k, v)
    assert (out - plain).abs().max() > 0.05                         # the features did something


def write_sinks(tmp_path, values: torch.Tensor) -> SafetensorsWeight:
    name = "model.layers.0.self_attn.sinks"
    save_file({name: values}, str(tmp_path / "model.safetensors"))
    return SafetensorsWeight(name, tuple(values.shape), tmp_path / "model.safetensors")


@pytest.mark.parametrize("sliding_window", [6, None])
def test_gpt_oss_sinks_match_transformers(sliding_window, tmp_path, monkeypatch):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    monkeypatch.setattr(attention_layer, "get_tp_rank", lambda: 1)
    monkeypatch.setattr(attention_layer, "get_tp_size", lambda: 2)
    checkpoint = torch.randn(2 * NUM_HEADS, dtype=torch.bfloat16) * 2     # every rank's heads, model dtype
    q, k, v = random_qkv()
    scale = HEAD_DIM ** -0.5
    layer = PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, scale, sliding_window=sliding_window, use_sinks=True)
    assert layer.sinks.dtype == torch.float32 and layer.sinks.shape == (NUM_HEADS,)
    assert [name for name, _ in layer.named_parameters()] == ["sinks"]
    layer.sinks.weight_loader(layer.sinks, write_sinks(tmp_path, checkpoint))
    torch.testing.assert_close(layer.sinks.data, checkpoint[NUM_HEADS:].float())   # rank 1's heads
    out = run_layer(layer, q, k, v)
    expected, _ = eager_attention_forward(_HFModule(checkpoint[NUM_HEADS:].float()), as_hf(q), as_hf(k), as_hf(v),
                                          transformers_mask(q.shape[0], sliding_window), scaling=scale)
    torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5)


def test_fp8_cache_keeps_the_features():
    q, k, v = random_qkv()
    scale = HEAD_DIM ** -0.5
    features = dict(sliding_window=5, logit_softcap=1.5, use_sinks=True)
    layer = PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, scale, **features)
    layer.sinks.data.copy_(torch.randn(NUM_HEADS))
    exact = run_layer(layer, q, k, v)
    fp8 = run_layer(layer, q, k, v, cache_dtype=torch.float8_e4m3fn)
    torch.testing.assert_close(fp8, exact, atol=0.1, rtol=0.1)            # e4m3 rounding of K and V only
    plain = PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, scale)
    assert (run_layer(plain, q, k, v, cache_dtype=torch.float8_e4m3fn) - fp8).abs().max() > 0.1


def test_checkpoint_sinks_names_the_parameter():
    assert PagedAttention.checkpoint_sinks("model.layers.3.self_attn.sinks") == "model.layers.3.self_attn.attn.sinks"
    assert PagedAttention.checkpoint_sinks("model.layers.3.self_attn.k_proj.weight") is None
    assert PagedAttention.checkpoint_sinks("model.layers.3.mlp.sinks") is None


def test_sinks_loader_rejects_a_wrong_checkpoint(tmp_path):
    layer = PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, 0.25, use_sinks=True)
    with pytest.raises(ValueError, match=r"self_attn.sinks.*\(4,\)"):
        layer.sinks.weight_loader(layer.sinks, write_sinks(tmp_path, torch.zeros(NUM_HEADS + 1)))
    with pytest.raises(ValueError, match="non-finite"):
        layer.sinks.weight_loader(layer.sinks, write_sinks(tmp_path, torch.full((NUM_HEADS,), float("nan"))))


@pytest.mark.parametrize("bad,match", [
    (dict(sliding_window=0), "sliding_window"), (dict(sliding_window=2.5), "sliding_window"),
    (dict(logit_softcap=-1.0), "logit_softcap"), (dict(logit_softcap=float("nan")), "logit_softcap"),
    (dict(use_sinks="yes"), "use_sinks"),
])
def test_rejects_bad_features(bad, match):
    with pytest.raises(ValueError, match=match):
        PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, 0.25, **bad)


def test_defaults_add_nothing():
    layer = PagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, 0.25)
    assert layer.sliding_window is None and layer.logit_softcap is None and layer.sinks is None
    assert list(layer.parameters()) == []
