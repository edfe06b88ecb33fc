"""GPU-only tests: skipped entirely where CUDA is absent (CI). Run on a GPU machine with
`python -m pytest -q tests/gpu` (see README)."""
import pytest
import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]


@pytest.fixture(autouse=True)
def _cuda_only():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
