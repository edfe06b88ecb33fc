"""Rounding to FP8 e4m3 inside Triton kernels, shared by the kernels that write FP8 (the FP8 W8A8
activation quantization, the FP8 KV cache write).

NOTE: why a kernel rounds by hand at all: the Triton interpreter's float32 -> e4m3 cast truncates
(and drops subnormals), so under the interpreter a kernel first rounds onto the e4m3 grid in float32
and the cast then only re-encodes an exact value; compiled for a GPU, the hardware cast rounds to
nearest even by itself and the kernels skip this.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(x):
    """x (float32, already within +-448) rounded to the nearest e4m3 value, ties to even, in
    float32 arithmetic: adding 2^23 e4m3-ulps of |x| makes float32's own rounding unit that ulp."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    exponent = tl.maximum(exponent, 127 - 6)          # e4m3 subnormals share the ulp 2^-9
    magic = ((exponent + 20) << 23).to(tl.float32, bitcast=True)    # 2^23 * 2^(exponent - 127 - 3)
    rounded = ((tl.abs(x) + magic) - magic).to(tl.int32, bitcast=True)
    return (rounded | (bits & -2147483648)).to(tl.float32, bitcast=True)            # x's sign, -0 included
