"""pagoda.kernels: the compute kernels of the model forward pass.

Each kernel family has a torch reference (used on CPU and as the test oracle) and a Triton
implementation chosen automatically for CUDA tensors (see `backend.py`).
"""
from .activation import silu_and_mul
from .attention import paged_attention
from .backend import get_backend, set_backend, use_backend
from .cache import reshape_and_cache
from .metadata import AttentionMetadata
from .norm import fused_add_rms_norm, rms_norm
from .rotary import apply_rotary

__all__ = [
    "AttentionMetadata",
    "apply_rotary",
    "fused_add_rms_norm",
    "get_backend",
    "paged_attention",
    "reshape_and_cache",
    "rms_norm",
    "set_backend",
    "silu_and_mul",
    "use_backend",
]
