"""Chooses between the Triton kernels and their torch references.

`auto` (the default) uses Triton for CUDA tensors when Triton imports, and the torch reference
everywhere else (CPU, or a machine without Triton). Tests force one side with `use_backend`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch

Backend = Literal["auto", "torch", "triton"]
_VALID: tuple[Backend, ...] = ("auto", "torch", "triton")
_backend: Backend = "auto"

try:  # Triton is a hard dependency on Linux, but keep the references usable without it.
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


def set_backend(backend: Backend) -> None:
    global _backend
    if backend not in _VALID:
        raise ValueError(f"kernel backend must be one of {_VALID}, got {backend!r}")
    _backend = backend


def get_backend() -> Backend:
    return _backend


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    previous = _backend
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the kernel for `tensor` should be the Triton one."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        return HAS_TRITON
    return HAS_TRITON and tensor.is_cuda
