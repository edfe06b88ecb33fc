"""Kernel tests: Triton kernels against their torch references.

Without CUDA the Triton kernels run in the Triton interpreter (numpy on CPU). `@triton.jit` picks
interpreter or compiler when a `*_triton` module is imported, so the variable is set here, before
the test modules import them, and any such module imported earlier (e.g. while collecting another
test folder) is reloaded. The setting is process-wide; nothing outside these tests runs Triton on CPU.
"""
import importlib
import os
import sys

import pytest
import torch

ON_CUDA = torch.cuda.is_available()

if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("pagoda.kernels.") and m.endswith("_triton")]:
        importlib.reload(sys.modules[_name])


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
