"""MXFP4 (engine/quantization/mxfp4.py): the decoder against a direct per-value decode of the bits
and against transformers' `convert_moe_packed_tensors`; the lazy expert tensor's slices (each reads
only the blocks it covers); pairing `_blocks` with `_scales` across a checkpoint; the registry;
refusals by name."""
from __future__ import annotations

import pytest
import torch

from pagoda.engine.model_loader.model_source import ModelSource
from pagoda.engine.model_loader.weights import LazyWeight
from pagoda.engine.quantization.mxfp4 import (Mxfp4Config, Mxfp4Weight, dequantize_mxfp4,
                                              dequantized_checkpoint)
from pagoda.engine.quantization.registry import resolve_quantization

E, ROWS, GROUPS = 3, 5, 4          # experts, output rows, blocks of 32 input features per row


class TensorWeight(LazyWeight):
    """An in-memory checkpoint tensor that records the slices read from it."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        super().__init__(name, tuple(tensor.shape))
        self.tensor = tensor
        self.reads: list[tuple] = []

    def _load(self, dim, start, length) -> torch.Tensor:
        self.reads.append((dim, start, length))
        return self.tensor.clone() if dim is None else self.tensor.narrow(dim, start, length).contiguous()


def e2m1(code: int) -> float:
    """One e2m1 value from its 4 bits: sign, 2 exponent bits (bias 1; 0 = subnormal), 1 mantissa bit."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    if exponent == 0:
        return sign * 0.5 * mantissa
    return sign * 2.0 ** (exponent - 1) * (1 + 0.5 * mantissa)


def decode_by_value(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., G, 16) bytes, (..., G) scales -> (..., G * 32), one value at a time."""
    flat_blocks, flat_scales = blocks.reshape(-1, 16).tolist(), scales.reshape(-1).tolist()
    out = []
    for row, scale in zip(flat_blocks, flat_scales):
        for byte in row:
            for code in (byte & 0x0F, byte >> 4):          # element 2i in the low nibble, 2i + 1 in the high
                out.append(e2m1(code) * 2.0 ** (scale - 127))
    return torch.tensor(out, dtype=torch.float64).reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def random_packed(seed: int = 0, shape=(E, ROWS, GROUPS)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=generator, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(115, 135, shape, generator=generator, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


def test_every_byte_decodes_as_the_per_value_formula():
    # every byte once; scales from 2^-127 (subnormal float32) to 2^123 (6 * 2^123 still finite)
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    scales = torch.tensor([0, 1, 100, 126, 127, 128, 130, 200, 250, 127, 127, 127, 90, 140, 127, 127],
                          dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (16 * 32,)
    want = decode_by_value(blocks, scales)
    assert torch.equal(got.double(), want)
    assert sorted({e2m1(c) for c in range(16)}) == [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0,
                                                     0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_blocks_decode_per_value_in_the_model_dtype(dtype):
    blocks, scales = random_packed()
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == (E, ROWS, GROUPS * 32)
    assert torch.equal(got.double(), decode_by_value(blocks, scales))      # exact in bf16 too


def test_lazy_expert_tensor_equals_transformers_convert_moe_packed_tensors():
    """transformers' decoder of the gpt-oss releases gives the same (E, in, rows) tensor."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_packed(1)
    weight = Mxfp4Weight("experts.gate_up_proj", TensorWeight("b", blocks), TensorWeight("s", scales),
                         torch.float32, torch.device("cpu"))
    assert weight.shape == (E, GROUPS * 32, ROWS)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(weight.load(), want)


@pytest.mark.parametrize("dim, start, length, reads", [
    (0, 1, 2, (0, 1, 2)),              # whole experts (expert parallel): the same experts' blocks
    (2, 1, 3, (1, 1, 3)),              # output rows (tensor parallel, gate/up): the blocks' rows
    (1, 32, 64, (2, 1, 2)),            # input features on block boundaries (tensor parallel, down)
    (1, 40, 50, (2, 1, 2)),            # not on block boundaries: the covering blocks, then trimmed
    (1, 0, 1, (2, 0, 1)),
    (1, 127, 1, (2, 3, 1)),
])
def test_slices_read_only_the_blocks_they_cover(dim, start, length, reads):
    blocks, scales = random_packed(2)
    packed_blocks, packed_scales = TensorWeight("b", blocks), TensorWeight("s", scales)
    weight = Mxfp4Weight("experts.down_proj", packed_blocks, packed_scales, torch.float32, torch.device("cpu"))
    full = decode_by_value(blocks, scales).float().transpose(1, 2)
    got = weight.load(dim=dim, start=start, length=length)
    assert torch.equal(got, full.narrow(dim, start, length))
    assert packed_blocks.reads == [reads] and packed_scales.reads == [reads]


def test_pairs_are_joined_across_the_checkpoint_and_other_tensors_pass_through():
    blocks, scales = random_packed(3)
    other = TensorWeight("model.norm.weight", torch.ones(4))
    bias = TensorWeight("model.layers.0.mlp.experts.down_proj_bias", torch.zeros(E, 8))
    stream = [("model.layers.0.mlp.experts.down_proj_scales", TensorWeight("s", scales)),
              ("model.norm.weight", other),
              ("model.layers.0.mlp.experts.down_proj_bias", bias),
              ("model.layers.0.mlp.experts.down_proj_blocks", TensorWeight("b", blocks))]
    out = list(dequantized_checkpoint(stream, torch.float32, torch.device("cpu")))
    assert [name for name, _ in out] == ["model.norm.weight", "model.layers.0.mlp.experts.down_proj_bias",
                                         "model.layers.0.mlp.experts.down_proj"]
    assert out[0][1] is other and out[1][1] is bias
    assert isinstance(out[2][1], Mxfp4Weight) and out[2][1].name == "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(out[2][1].load().double(), decode_by_value(blocks, scales).transpose(1, 2))


def test_a_half_pair_or_a_repeated_tensor_is_refused_by_name():
    blocks, scales = random_packed()
    lone = [("layers.0.mlp.experts.gate_up_proj_blocks", TensorWeight("b", blocks))]
    with pytest.raises(ValueError, match=r"layers.0.mlp.experts.gate_up_proj_blocks has no matching "
                                         r"layers.0.mlp.experts.gate_up_proj_scales"):
        list(dequantized_checkpoint(lone, torch.float32, torch.device("cpu")))
    twice = [("x_scales", TensorWeight("s", scales)), ("x_scales", TensorWeight("s", scales))]
    with pytest.raises(ValueError, match="checkpoint tensor 'x_scales' appears twice"):
        list(dequantized_checkpoint(twice, torch.float32, torch.device("cpu")))


def test_bad_tensors_are_refused_by_name():
    blocks, scales = random_packed()
    with pytest.raises(ValueError, match=r"'b' \(3, 5, 4, 16\) and 's' \(3, 5, 3\) are not MXFP4 expert blocks"):
        Mxfp4Weight("w", TensorWeight("b", blocks), TensorWeight("s", scales[..., :3]), torch.float32,
                    torch.device("cpu"))
    nan = scales.clone()
    nan[1, 2, 3] = 255
    weight = Mxfp4Weight("w", TensorWeight("b", blocks), TensorWeight("s", nan), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="checkpoint tensor 's' holds the e8m0 NaN scale 255"):
        weight.load()
    signed = Mxfp4Weight("w", TensorWeight("b", blocks.view(torch.int8)), TensorWeight("s", scales),
                         torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"'b' / 's' must be uint8 .* got torch.int8 / torch.uint8"):
        signed.load()
    with pytest.raises(ValueError, match=r"MXFP4 blocks of shape \(3, 5, 4, 8\) need scales of shape"):
        dequantize_mxfp4(blocks[..., :8], scales, torch.float32)


class _Config:
    def __init__(self, quantization_config=None) -> None:
        if quantization_config is not None:
            self.quantization_config = quantization_config


def test_registry_resolves_the_checkpoint_scheme(tmp_path):
    source = ModelSource(path=tmp_path, gguf_file=None, name="tiny")
    checkpoint = _Config({"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]})
    for requested in (None, "mxfp4"):
        config = resolve_quantization(requested, checkpoint, source, torch.device("cpu"))
        assert isinstance(config, Mxfp4Config) and config.modules_to_not_convert == ("lm_head",)
    assert type(config.linear_method("model.layers.0.self_attn.qkv_proj")).__name__ == "UnquantizedLinearMethod"
    assert "dequantized" in config.describe()
    with pytest.raises(ValueError, match="quantization='fp8' does not match the checkpoint"):
        resolve_quantization("fp8", checkpoint, source, torch.device("cpu"))
    with pytest.raises(ValueError, match="quantization='mxfp4' needs a checkpoint quantized that way"):
        resolve_quantization("mxfp4", _Config(), source, torch.device("cpu"))
    with pytest.raises(ValueError, match="MXFP4 quantization_config is invalid"):
        Mxfp4Config.from_checkpoint({"quant_method": "mxfp4", "modules_to_not_convert": 3})
