"""FP8 W8A8 kernels (Triton, in the interpreter on CPU) against the torch reference.

Quantization must be bit-exact: the same float32 scales and the same e4m3 codes, including ties
(round to nearest even), subnormals, saturation at +-448 and all-zero tokens. The GEMM accumulates
exact products in float32 in another order than the reference: tolerance 1e-5 relative for a
float32 output; for fp16/bf16 one unit of the output dtype (the interpreter rounds bf16 by
truncation). `torch._scaled_mm` (cuBLAS FP8) is GPU-only; its call (scale shapes, operand layout,
`out=`) is also checked on CPU, where torch implements the same operator.
"""
from __future__ import annotations

import pytest
import torch

from pagoda.kernels import fp8_triton
from pagoda.kernels.backend import use_backend
from pagoda.kernels.fp8 import (FP8_DTYPE, fp8_linear, fp8_linear_ref, quantize_per_token, quantize_static,
                                quantize_weight_per_channel)

ON_CUDA = torch.cuda.is_available()
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == FP8_DTYPE and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def random_layer(n: int, k: int, device, dtype=torch.float32):
    weight = torch.randn(n, k, device=device) * 0.05
    weight[0] = 0                                                   # an all-zero output channel
    w_q, w_scale = quantize_weight_per_channel(weight)
    bias = (torch.randn(n, device=device) * 0.1).to(dtype)
    return w_q, w_scale, bias


# ---- quantization --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 96, 9000])                 # 9000: more than one step of the kernel
def test_per_token_quantization_is_bit_exact(k, dtype, device):
    x = (torch.randn(5, k, device=device) * torch.logspace(-3, 2, 5, device=device)[:, None]).to(dtype)
    x[2] = 0                                                      # a token of zeros: scale from MIN_AMAX
    x_q, scale = fp8_triton.quantize(x)
    ref_q, ref_scale = quantize_per_token(x)
    assert scale.shape == (5, 1) and torch.equal(scale, ref_scale)
    assert same_codes(x_q, ref_q)
    assert torch.all(x_q[2].float() == 0)


def test_ties_subnormals_and_saturation_round_like_torch(device):
    """Every e4m3 value, the midpoints between neighbours (ties go to the even code), points just
    off them, the subnormal range and values past 448, quantized with scale 1."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).float()      # 0 .. 448, no NaN
    mids = (codes[1:] + codes[:-1]) / 2
    values = torch.cat([codes, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20), torch.tensor([449., 464., 1e4]),
                        torch.linspace(0, 2 ** -6, 101)])
    values = torch.cat([values, -values]).to(device)[None, :]
    x_q, _ = fp8_triton.quantize(values, torch.ones(1, device=device))
    ref_q, _ = quantize_static(values, torch.ones(1, device=device))
    assert same_codes(x_q, ref_q)
    assert x_q.float().abs().max() == 448


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_static_quantization_is_bit_exact(dtype, device):
    x = (torch.randn(4, 200, device=device) * 3).to(dtype)
    input_scale = torch.tensor([0.004], device=device)          # saturates the largest values
    x_q, scale = fp8_triton.quantize(x, input_scale)
    ref_q, ref_scale = quantize_static(x, input_scale)
    assert torch.equal(scale, ref_scale) and same_codes(x_q, ref_q)
    assert (x_q.float().abs() == 448).any()


def test_kernel_constants_are_the_reference_ones():
    from pagoda.kernels import fp8

    assert (fp8_triton.FP8_DTYPE, fp8_triton.MIN_AMAX) == (fp8.FP8_DTYPE, fp8.MIN_AMAX)


def test_weight_quantization_per_channel():
    weight = torch.randn(70, 33) * torch.logspace(-4, 1, 70)[:, None]
    w_q, scale = quantize_weight_per_channel(weight, rows_per_chunk=16)     # several chunks
    assert w_q.dtype == FP8_DTYPE and scale.shape == (70,) and scale.dtype == torch.float32
    assert torch.equal(scale, weight.abs().amax(dim=1) / 448)
    assert torch.equal(w_q.float().abs().amax(dim=1), torch.full((70,), 448.0))   # each row's max maps to 448
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 above the subnormal range
    restored = w_q.float() * scale[:, None]
    normal = (weight / scale[:, None]).abs() >= 2 ** -6
    assert ((restored - weight).abs()[normal] <= weight.abs()[normal] * 2 ** -4).all()


# ---- the GEMM ------------------------------------------------------------------------------------

def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCES[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, 16, 17, 70])                 # small-M kernel up to 16, then the large path
@pytest.mark.parametrize("n, k", [(48, 96), (40, 200)])           # N, K off the tile sizes too
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_fp8_linear_matches_reference(m, n, k, static, with_bias, device):
    w_q, w_scale, bias = random_layer(n, k, device)
    x = torch.randn(m, k, device=device)
    input_scale = torch.tensor([0.01], device=device) if static else None
    bias = bias if with_bias else None
    assert_close_to_reference(fp8_triton.fp8_linear(x, w_q, w_scale, input_scale, bias),
                              fp8_linear_ref(x, w_q, w_scale, input_scale, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fp8_linear_half_precision(m, dtype, device):
    w_q, w_scale, bias = random_layer(64, 128, device, dtype)
    x = torch.randn(m, 128, device=device).to(dtype)
    for input_scale in (None, torch.tensor([0.02], device=device)):
        assert_close_to_reference(fp8_triton.fp8_linear(x, w_q, w_scale, input_scale, bias),
                                  fp8_linear_ref(x, w_q, w_scale, input_scale, bias))


@pytest.mark.parametrize("m", [2, 20])
def test_writes_into_out_with_a_row_stride(m, device):
    """A row-parallel layer hands `out`, a (T, N) view of a wider buffer (the fused all-reduce's slot)."""
    w_q, w_scale, _ = random_layer(32, 64, device)
    x = torch.randn(m, 64, device=device)
    buffer = torch.full((m, 48), 7.0, device=device)
    out = buffer[:, :32]
    result = fp8_triton.fp8_linear(x, w_q, w_scale, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close_to_reference(out, fp8_linear_ref(x, w_q, w_scale))
    assert torch.all(buffer[:, 32:] == 7.0)


def test_leading_dims_and_empty_batch(device):
    w_q, w_scale, bias = random_layer(24, 32, device)
    x = torch.randn(2, 3, 32, device=device)
    assert_close_to_reference(fp8_triton.fp8_linear(x, w_q, w_scale, bias=bias),
                              fp8_linear_ref(x, w_q, w_scale, bias=bias))
    assert fp8_triton.fp8_linear(x[:0, 0], w_q, w_scale).shape == (0, 24)


def test_dispatch(device):
    w_q, w_scale, bias = random_layer(24, 32, device)
    x = torch.randn(3, 32, device=device)
    expected = fp8_linear_ref(x, w_q, w_scale, bias=bias)
    with use_backend("triton"):
        assert_close_to_reference(fp8_linear(x, w_q, w_scale, bias=bias), expected)
    with use_backend("torch"):
        out = torch.empty(3, 24, device=device)
        assert fp8_linear(x, w_q, w_scale, bias=bias, out=out) is out
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bad_inputs_are_named(device):
    w_q, w_scale, _ = random_layer(24, 32, device)
    x = torch.randn(3, 32, device=device)
    with pytest.raises(ValueError, match="w_q must be"):
        fp8_triton.fp8_linear(x, w_q.float(), w_scale)
    with pytest.raises(ValueError, match="input features"):
        fp8_triton.fp8_linear(torch.randn(3, 31, device=device), w_q, w_scale)
    with pytest.raises(ValueError, match="w_scale must be 24"):
        fp8_triton.fp8_linear(x, w_q, w_scale[:5])
    with pytest.raises(ValueError, match="input_scale must be one float32"):
        fp8_triton.fp8_linear(x, w_q, w_scale, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="out must be"):
        fp8_triton.fp8_linear(x, w_q, w_scale, out=torch.empty(3, 25, device=device))


def test_small_m_tiles():
    """The decode tiles read each weight byte once (one 16-row tile) and, at llama3-8b's widths,
    give every SM of an H100 (132) about 4 programs: wide layers take wider tiles, narrow ones with
    a long K split it."""
    for n, k in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)):
        config = fp8_triton.small_m_config(1, n, k, num_sms=132)
        assert config["BLOCK_M"] == 16 and config["BLOCK_N"] in (16, 32, 64)
        assert -(-n // config["BLOCK_N"]) * config["SPLIT_K"] >= 4 * 132 or k // config["SPLIT_K"] < 2048
    assert fp8_triton.small_m_config(1, 28672, 4096, 132)["BLOCK_N"] == 32
    assert fp8_triton.small_m_config(1, 28672, 4096, 132)["SPLIT_K"] == 1
    assert fp8_triton.small_m_config(16, 4096, 14336, 132)["SPLIT_K"] == 4          # 256 tiles x 4 ranges
    assert fp8_triton.small_m_config(1, 64, 512, 132)["SPLIT_K"] == 1               # K too short to split


@pytest.mark.parametrize("split_k", [2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_k_matches_reference(split_k, with_bias, device):
    """K split into ranges (the last one short; at split 4 of K=160 with BLOCK_K=32 one is empty):
    the partial sums add up to the one-pass GEMM's result."""
    torch.manual_seed(split_k)
    w_q, w_scale, bias = random_layer(40, 160, device)
    x = torch.randn(5, 160, device=device)
    expected = fp8_linear_ref(x, w_q, w_scale, bias=bias if with_bias else None)
    x_q, x_scale = fp8_triton.quantize(x)
    out = torch.empty(5, 40, device=device)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k, num_warps=4, num_stages=1)
    fp8_triton._launch_gemm(out, x_q, x_scale, w_q, w_scale.reshape(-1), bias if with_bias else None, config)
    assert_close_to_reference(out, expected)


def test_split_k_is_one_launch_that_leaves_its_counters_at_zero(device):
    """The last split of each tile adds the partials in split order: repeated calls give the same bits,
    the counters are back at 0 and the scratch is the device's, not a new buffer per call."""
    from pagoda.kernels import split_k_triton

    w_q, w_scale, bias = random_layer(72, 256, device)
    x = torch.randn(20, 256, device=device)                                 # 2 row tiles x 5 column tiles
    x_q, x_scale = fp8_triton.quantize(x)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=4, num_warps=4, num_stages=1)
    buffer = torch.full((20, 80), 7.0, device=device)
    out = buffer[:, :72]                                                    # a row stride past N
    fp8_triton._launch_gemm(out, x_q, x_scale, w_q, w_scale, bias, config)
    first = out.clone()
    scratch = split_k_triton.partials(device, 4, 20, 72).data_ptr()
    fp8_triton._launch_gemm(out, x_q, x_scale, w_q, w_scale, bias, config)
    assert torch.equal(out, first) and torch.all(buffer[:, 72:] == 7.0)
    assert_close_to_reference(out, fp8_linear_ref(x, w_q, w_scale, bias=bias))
    assert int(split_k_triton.tile_counters(device, 10)[:10].abs().sum()) == 0
    assert split_k_triton.partials(device, 4, 20, 72).data_ptr() == scratch
    assert split_k_triton.split_count(5, 4) == (2, 3) and split_k_triton.split_count(8, 4) == (2, 4)


# ---- torch._scaled_mm ----------------------------------------------------------------------------

def scaled_mm_case(m: int, device):
    w_q, w_scale, bias = random_layer(64, 128, device, torch.bfloat16)
    x = torch.randn(m, 128, device=device).to(torch.bfloat16)
    x_q, x_scale = quantize_per_token(x)
    return x, x_q, x_scale, w_q, w_scale, bias


def test_scaled_mm_call_on_cpu():
    """The cuBLAS path's arguments (row-wise (M, 1) / (1, N) float32 scales, the weight's
    column-major transpose, out=, the bias added after) checked with torch's CPU operator."""
    x, x_q, x_scale, w_q, w_scale, bias = scaled_mm_case(24, "cpu")
    out = torch.empty(24, 64, dtype=torch.bfloat16)
    try:
        fp8_triton._scaled_mm(x_q, x_scale, w_q, w_scale, bias, out)
    except (NotImplementedError, RuntimeError) as error:
        pytest.skip(f"this torch has no row-wise scaled FP8 matmul on CPU: {error}")
    expected = fp8_linear_ref(x, w_q, w_scale, bias=bias)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU")
@pytest.mark.parametrize("m", [17, 256])
def test_scaled_mm_path_on_gpu(m):
    x, x_q, x_scale, w_q, w_scale, bias = scaled_mm_case(m, "cuda")
    assert fp8_triton.scaled_mm_supported(x, 64, 128)
    for with_bias in (None, bias):
        assert_close_to_reference(fp8_triton.fp8_linear(x, w_q, w_scale, bias=with_bias),
                                  fp8_linear_ref(x, w_q, w_scale, bias=with_bias))


# compiling these kernels for sm_89 / sm_90: tests/kernels/test_compile.py

