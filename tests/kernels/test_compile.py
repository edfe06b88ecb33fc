"""The Triton kernels compile for real GPUs (sm_80 and sm_90), checked on a machine without one.

The CPU tests run kernels in the Triton interpreter, which executes the Python body and never
type-checks or lowers it, so a kernel can pass every interpreter test and still fail to compile on
a GPU. This test compiles each launch configuration the wrappers produce down to a cubin with
Triton's bundled ptxas, in a subprocess (the tests run Triton in interpreter mode, a process-wide setting).
It uses Triton internals (the launch binder), so it skips itself if those move. On a CUDA machine
the other tests compile the kernels for real and this one is skipped.
"""
from __future__ import annotations

import pytest
import torch
from triton_compile import compile_launches

LAUNCHES = '''

    from pagoda.kernels import activation_triton, attention_triton, cache_triton, norm_triton, rotary_triton

    metadata = attention_metadata      # (the harness's)

    for dtype, num_heads, num_kv_heads, head_dim in ((torch.bfloat16, 32, 8, 128), (torch.float32, 8, 8, 96)):
        cache = torch.zeros(64, 16, num_kv_heads, head_dim, dtype=dtype)
        prefill = metadata([1, 300], [40, 500])
        query = torch.zeros(301, num_heads, head_dim, dtype=dtype)
        attention_triton.paged_attention(query, cache, cache, prefill, 0.1)
        decode = metadata([1, 1], [40, 1000])
        out = torch.empty(2, num_heads, head_dim, dtype=dtype)
        attention_triton.decode_attention(query[:2], cache, cache, decode, 0.1, out=out, num_splits=4)
    bf16 = torch.bfloat16
    key = torch.zeros(4, 8, 128, dtype=bf16)
    cache_triton.reshape_and_cache(key, key, torch.zeros(4, 16, 8, 128, dtype=bf16),
                                   torch.zeros(4, 16, 8, 128, dtype=bf16), torch.arange(4))
    x = torch.zeros(4, 4096, dtype=bf16)
    norm_triton.rms_norm(x, x[0], 1e-5)
    norm_triton.fused_add_rms_norm(x, x, x[0], 1e-5)
    rotary_triton.apply_rotary(torch.arange(4), torch.zeros(4, 32, 128, dtype=bf16), key, torch.zeros(8, 128))
    activation_triton.silu_and_mul(torch.zeros(4, 2 * 14336, dtype=bf16))
'''


EXPECTED = ["_prefill_kernel", "_decode_kernel", "_decode_reduce_kernel", "_reshape_and_cache_kernel",
            "_rms_norm_kernel", "_fused_add_rms_norm_kernel", "_rotary_kernel", "_silu_and_mul_kernel"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile for real")
def test_kernels_compile_for_sm80_and_sm90():
    compiled = compile_launches(LAUNCHES, (80, 90))
    if compiled is None:
        pytest.skip("Triton internals moved")
    missing = [f"{name}@sm_{arch}" for name in EXPECTED for arch in (80, 90) if f"{name}@sm_{arch}" not in compiled]
    assert not missing, f"not compiled: {missing}"


# the kernels that need FP8 hardware (e4m3 conversions): FP8 W8A8 and the FP8 KV cache, for sm_89 and sm_90
FP8_LAUNCHES = '''
    from pagoda.kernels import attention_triton, cache_triton, fp8_triton, weight_only_triton

    w = torch.zeros(4096, 4096, dtype=torch.float8_e4m3fn)
    for dtype in (torch.bfloat16, torch.float32):
        for m in (1, 64):            # the decode tiles; the large-M tiles (no cuBLAS on this machine)
            x = torch.zeros(m, 4096, dtype=dtype)
            fp8_triton.fp8_linear(x, w, torch.ones(4096), torch.ones(1), torch.zeros(4096, dtype=dtype))
            fp8_triton.fp8_linear(x, w, torch.ones(4096))
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    key = torch.zeros(4, 8, 128, dtype=bf16)
    cache = torch.zeros(64, 16, 8, 128, dtype=fp8)
    scale = torch.ones(1, dtype=torch.float32)
    cache_triton.reshape_and_cache(key, key, cache, cache, torch.arange(4), k_scale=scale, v_scale=scale)
    prefill = attention_metadata([1, 300], [40, 500])
    query = torch.zeros(301, 32, 128, dtype=bf16)
    attention_triton.paged_attention(query, cache, cache, prefill, 0.1, k_scale=scale, v_scale=scale)
    out = torch.empty(2, 32, 128, dtype=bf16)
    attention_triton.decode_attention(query[:2], cache, cache, attention_metadata([1, 1], [40, 1000]), 0.1,
                                      out=out, num_splits=4, k_scale=scale, v_scale=scale)
'''

# the weight-only kernels (no FP8): sm_80 and sm_90, int4 and int8; the GEMV (M <= 8, also split) and the
# tensor-core GEMM (split at small M, whole at large M), with the configs pick_config would choose and explicit ones
WEIGHT_ONLY_LAUNCHES = '''
    from pagoda.kernels import weight_only_triton as wt
    from pagoda.kernels.weight_only import GroupQuantWeight

    for bits, group in ((4, 128), (8, 32)):
        weight = GroupQuantWeight(torch.zeros(4096, 4096 * bits // 8, dtype=torch.uint8), bits, group,
                                  torch.ones(4096, 4096 // group, dtype=torch.float16), zero=8)
        for m in (1, 16, 256):
            wt.weight_only_linear(torch.zeros(m, 4096, dtype=torch.bfloat16), weight)
        for m, config in ((1, wt.GemmConfig(1, 32, 256, 4)), (4, wt.GemmConfig(4, 16, 128, 1)),
                          (8, wt.GemmConfig(16, 64, 128, 2))):
            wt.weight_only_linear(torch.zeros(m, 4096, dtype=torch.bfloat16), weight, config=config)
    # 6 bits (GGUF Q6_K): a 4-bit and a 2-bit plane, int8 sub-scales of 16 values under fp16 super-scales
    six = GroupQuantWeight(torch.zeros(4096, 2048, dtype=torch.uint8), 6, 16, torch.ones(4096, 256, dtype=torch.int8),
                           zero=32, super_scales=torch.ones(4096, 16, dtype=torch.float16),
                           qweight_high=torch.zeros(4096, 1024, dtype=torch.uint8))
    for m in (1, 16, 256):
        wt.weight_only_linear(torch.zeros(m, 4096, dtype=torch.bfloat16), six)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile for real")
def test_fp8_kernels_compile_for_sm89_and_sm90():
    compiled = compile_launches(FP8_LAUNCHES, (89, 90))
    if compiled is None:
        pytest.skip("Triton internals moved")
    expected = {f"{name}@sm_{arch}" for name in ("_quantize_kernel", "_fp8_gemm_kernel", "_reshape_and_cache_kernel",
                                                "_prefill_kernel", "_decode_kernel") for arch in (89, 90)}
    assert expected <= compiled, f"not compiled: {sorted(expected - compiled)}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile for real")
def test_weight_only_kernels_compile_for_sm80_and_sm90():
    compiled = compile_launches(WEIGHT_ONLY_LAUNCHES, (80, 90))
    if compiled is None:
        pytest.skip("Triton internals moved")
    expected = {f"{name}@sm_{arch}" for name in ("_weight_only_gemv_kernel", "_weight_only_gemm_kernel")
                for arch in (80, 90)}
    assert expected <= compiled, f"not compiled: {sorted(expected - compiled)}"
