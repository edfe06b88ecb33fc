"""Kernel tests: Triton kernels against their torch references.

Without CUDA the Triton kernels run in the Triton interpreter (numpy on CPU): the root conftest sets
TRITON_INTERPRET=1 before anything imports triton, so every `*_triton` module, whichever test folder
imports it first, is interpreted; nothing is reloaded here.
"""
import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
assert ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
