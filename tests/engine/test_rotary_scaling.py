"""Rope tables (engine/layers/rotary.py) against transformers' rotary embeddings: longrope (short and
long factors, the attention factor), partial rotary, Gemma 3's two rope bases with linear scaling, and
the sharing of one table by equal layers."""
from __future__ import annotations

import pytest
import torch
import transformers

from pagoda.engine.layers.rotary import RotaryEmbedding, rope_parameters, rotary_dim_of
from pagoda.engine.models.gemma import gemma3_rope

HEAD_DIM = 32


def phi3_config(**overrides) -> transformers.Phi3Config:
    rotary_dim = int(HEAD_DIM * overrides.get("partial_rotary_factor", 1.0))
    settings = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    original_max_position_embeddings=64,
                    rope_scaling={"type": "longrope",
                                  "short_factor": [1.0 + 0.1 * i for i in range(rotary_dim // 2)],
                                  "long_factor": [2.0 + 0.5 * i for i in range(rotary_dim // 2)]})
    settings.update(overrides)
    return transformers.Phi3Config(**settings)


def hf_cos_sin(rotary: torch.nn.Module, positions: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' (cos, sin) for `positions` (one forward call), each (T, rotary_dim) halves repeated."""
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, positions[None], **kwargs)
    return cos[0], sin[0]


def ours(config, max_position: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    theta, scaling = rope_parameters(config)
    table = RotaryEmbedding(HEAD_DIM, max_position, theta, scaling).cos_sin_cache[positions]
    cos, sin = table.chunk(2, dim=-1)
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


@pytest.mark.parametrize("partial", [1.0, 0.75], ids=["full", "partial-0.75"])
def test_longrope_short_factors_when_the_engine_fits_the_original_context(partial):
    """max_model_len <= original_max_position_embeddings: short factors, as transformers uses for
    every sequence that short; the attention factor (from 256 / 64) scales cos and sin all the same."""
    config = phi3_config(partial_rotary_factor=partial)
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    positions = torch.arange(64)
    want_cos, want_sin = hf_cos_sin(Phi3RotaryEmbedding(config), positions)
    cos, sin = ours(config, 64, positions)
    assert cos.shape == (64, int(HEAD_DIM * partial))
    torch.testing.assert_close(cos, want_cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, want_sin, atol=1e-6, rtol=1e-6)
    assert cos[0, 0].item() == pytest.approx(Phi3RotaryEmbedding(config).attention_scaling)
    assert cos[0, 0].item() > 1.0           # the attention factor is there


@pytest.mark.parametrize("partial", [1.0, 0.75], ids=["full", "partial-0.75"])
def test_longrope_long_factors_when_the_engine_exceeds_it(partial):
    """max_model_len > original: long factors, as transformers uses for a sequence past the original length."""
    config = phi3_config(partial_rotary_factor=partial)
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    positions = torch.arange(100)                 # one call up to position 99 > 64: transformers goes long
    want_cos, want_sin = hf_cos_sin(Phi3RotaryEmbedding(config), positions)
    cos, sin = ours(config, 256, positions)
    torch.testing.assert_close(cos, want_cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, want_sin, atol=1e-6, rtol=1e-6)
    short_cos, _ = ours(config, 64, positions[:64])
    assert not torch.allclose(cos[:64], short_cos)      # the two factor sets really differ


def test_longrope_explicit_attention_factor_wins():
    config = phi3_config()
    theta, scaling = rope_parameters(config)
    table = RotaryEmbedding(HEAD_DIM, 16, theta, {**scaling, "attention_factor": 1.5}).cos_sin_cache
    assert table[0, 0].item() == pytest.approx(1.5)            # cos(0) * 1.5


def test_partial_rotary_factor_from_the_config_top_level():
    """Older configs put partial_rotary_factor beside the rope settings, not inside them."""
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=HEAD_DIM)
    config.partial_rotary_factor = 0.5
    _, scaling = rope_parameters(config)
    assert rotary_dim_of(HEAD_DIM, scaling) == 16
    assert RotaryEmbedding(HEAD_DIM, 8, 10000.0, scaling).cos_sin_cache.shape == (8, 16)


@pytest.mark.parametrize("factor", [0.0, 1.5, 0.01])
def test_bad_partial_rotary_factor_is_refused(factor):
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rotary_dim_of(HEAD_DIM, {"partial_rotary_factor": factor})


def test_longrope_factor_count_is_checked():
    config = phi3_config()
    theta, scaling = rope_parameters(config)
    with pytest.raises(ValueError, match="short_factor has 16 entries, expected 12"):
        RotaryEmbedding(HEAD_DIM, 16, theta, {**scaling, "partial_rotary_factor": 0.75})


def test_unknown_rope_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="'dynamic' is not supported; supported: .*longrope"):
        RotaryEmbedding(HEAD_DIM, 16, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_gemma3_local_and_global_rope(layer_type):
    """Local layers: rope_local_base_freq, unscaled; global layers: rope_theta with linear scaling."""
    config = transformers.Gemma3TextConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=HEAD_DIM, num_hidden_layers=6, rope_theta=50000.0,
                                           rope_local_base_freq=500.0,
                                           rope_scaling={"rope_type": "linear", "factor": 8.0})
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    positions = torch.arange(40)
    want_cos, want_sin = hf_cos_sin(Gemma3RotaryEmbedding(config), positions, layer_type=layer_type)
    theta, scaling = gemma3_rope(config, layer_type)
    assert theta == (500.0 if layer_type == "sliding_attention" else 50000.0)
    cos, sin = RotaryEmbedding(HEAD_DIM, 40, theta, scaling).cos_sin_cache.chunk(2, dim=-1)
    torch.testing.assert_close(torch.cat((cos, cos), -1), want_cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat((sin, sin), -1), want_sin, atol=1e-6, rtol=1e-6)


def test_gemma3_rope_from_an_older_flat_config():
    """A config object without per-layer-type rope_parameters (rope_theta / rope_local_base_freq)."""
    from types import SimpleNamespace

    config = SimpleNamespace(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear",
                                                                                      "factor": 8.0})
    assert gemma3_rope(config, "sliding_attention") == (1e4, {})
    theta, scaling = gemma3_rope(config, "full_attention")
    assert theta == 1e6 and scaling["factor"] == 8.0


def test_equal_layers_share_one_table():
    a = RotaryEmbedding.shared(HEAD_DIM, 64, 10000.0, {"rope_type": "default"})
    b = RotaryEmbedding.shared(HEAD_DIM, 64, 10000.0, {"rope_type": "default"})
    c = RotaryEmbedding.shared(HEAD_DIM, 64, 20000.0, {"rope_type": "default"})
    assert a is b and a is not c
    assert not torch.equal(a.cos_sin_cache, c.cos_sin_cache)
