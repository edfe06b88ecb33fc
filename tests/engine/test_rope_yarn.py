"""YaRN rope tables (engine/layers/rotary.py) against transformers' rope init function for "yarn"
(`ROPE_INIT_FUNCTIONS["yarn"]`: inverse frequencies and attention factor) and gpt-oss's rotary
embedding (cos / sin per position): gpt-oss's own parameters (no truncation of the correction range),
the truncated range, an explicit attention factor, DeepSeek-style `mscale` / `mscale_all_dim`, a
factor derived from the context lengths, partial rotary; and refusals by name."""
from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagoda.engine.layers.rotary import RotaryEmbedding, rope_parameters, rotary_dim_of

HEAD_DIM = 64
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
CASES = {
    "gpt-oss": GPT_OSS_YARN,
    # the correction range floored / ceiled (transformers' default), another base and betas
    "truncated": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0,
                  "original_max_position_embeddings": 512, "rope_theta": 10000.0},
    "attention-factor": {**GPT_OSS_YARN, "attention_factor": 1.25},
    "mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
               "original_max_position_embeddings": 4096, "rope_theta": 10000.0},
    # no factor: max_position_embeddings / original_max_position_embeddings (8192 / 1024)
    "derived-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024,
                       "rope_theta": 500000.0},
    "partial-0.5": {**GPT_OSS_YARN, "partial_rotary_factor": 0.5},
}


def gpt_oss_config(rope: dict) -> transformers.GptOssConfig:
    return transformers.GptOssConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=HEAD_DIM, num_hidden_layers=1, num_local_experts=2,
                                     num_experts_per_tok=1, vocab_size=64, max_position_embeddings=8192,
                                     rope_parameters=dict(rope))


def ours(config, max_position: int) -> RotaryEmbedding:
    theta, scaling = rope_parameters(config)
    return RotaryEmbedding(HEAD_DIM, max_position, theta, scaling)


@pytest.mark.parametrize("name", list(CASES))
def test_table_equals_transformers_yarn_frequencies_and_attention_factor(name):
    config = gpt_oss_config(CASES[name])
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rotary = ours(config, 300)
    rotary_dim = rotary_dim_of(HEAD_DIM, rope_parameters(config)[1])
    assert rotary.rotary_dim == rotary_dim == 2 * inv_freq.numel()
    freqs = torch.outer(torch.arange(300, dtype=torch.float32), inv_freq.float())
    want = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor
    torch.testing.assert_close(rotary.cos_sin_cache, want, atol=1e-6, rtol=1e-6)
    assert rotary.cos_sin_cache[0, 0].item() == pytest.approx(attention_factor, rel=1e-6)    # cos(0) * factor


def test_gpt_oss_rotary_embedding_cos_sin_match():
    """transformers' GptOssRotaryEmbedding forward (cos, sin of half width, times the attention factor)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    config = gpt_oss_config(GPT_OSS_YARN)
    positions = torch.tensor([0, 1, 7, 100, 4095, 4096, 8000])
    cos, sin = GptOssRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    table = ours(config, 8192).cos_sin_cache[positions]
    ours_cos, ours_sin = table.chunk(2, dim=-1)
    torch.testing.assert_close(ours_cos, cos[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_sin, sin[0], atol=1e-6, rtol=1e-6)


def test_yarn_blends_between_the_original_and_interpolated_frequencies():
    """High frequencies kept, low ones divided by the factor (so a wrong ramp direction fails)."""
    config = gpt_oss_config(GPT_OSS_YARN)
    theta, scaling = rope_parameters(config)
    plain = RotaryEmbedding(HEAD_DIM, 2, theta, {}).cos_sin_cache[1, :HEAD_DIM // 2].acos()  # = inv_freq (< pi)
    table = ours(config, 2).cos_sin_cache
    yarn = (table[1, :HEAD_DIM // 2] / table[0, 0]).clamp(-1, 1).acos()
    assert yarn[0].item() == pytest.approx(plain[0].item(), rel=1e-5)                  # fastest: extrapolated
    assert yarn[-1].item() == pytest.approx(plain[-1].item() / 32.0, rel=1e-3)         # slowest: / factor
    assert table[0, 0].item() == pytest.approx(0.1 * math.log(32.0) + 1.0, rel=1e-6)


def test_truncate_changes_the_ramp():
    """truncate (absent = true) floors / ceils the correction range: the tables differ from gpt-oss's."""
    untruncated = ours(gpt_oss_config(GPT_OSS_YARN), 64).cos_sin_cache
    truncated = ours(gpt_oss_config({**GPT_OSS_YARN, "truncate": True}), 64).cos_sin_cache
    assert not torch.allclose(untruncated, truncated)


def test_yarn_without_original_context_is_refused():
    with pytest.raises(ValueError, match="rope_type 'yarn' needs original_max_position_embeddings"):
        RotaryEmbedding(HEAD_DIM, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0})
