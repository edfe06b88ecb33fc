"""The weight-only GEMV and GEMM compile for sm_80 and sm_90 (see test_compile.py for why and how)."""
from __future__ import annotations

import pytest
import torch
from triton_compile import compile_launches

LAUNCHES = '''
    from pagoda.kernels import weight_only_triton as wt
    from pagoda.kernels.weight_only import GroupQuantWeight

    for bits, group in ((4, 128), (8, 32)):
        weight = GroupQuantWeight(torch.zeros(4096, 4096 * bits // 8, dtype=torch.uint8), bits, group,
                                  torch.ones(4096, 4096 // group, dtype=torch.float16), zero=8)
        for m, config in ((1, wt.GemmConfig(1, 32, 256, 4)), (4, wt.GemmConfig(4, 16, 128, 1)),
                          (8, wt.GemmConfig(16, 64, 128, 2))):
            wt.weight_only_linear(torch.zeros(m, 4096, dtype=torch.bfloat16), weight, config=config)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile for real")
def test_gemv_and_split_gemm_compile_for_sm80_and_sm90():
    compiled = compile_launches(LAUNCHES, (80, 90))
    if compiled is None:
        pytest.skip("Triton internals moved")
    expected = {f"{name}@sm_{arch}" for name in ("_weight_only_gemv_kernel", "_weight_only_gemm_kernel")
                for arch in (80, 90)}
    assert expected <= compiled, compiled
