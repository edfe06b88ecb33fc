"""Shared pytest setup: Hugging Face stays offline, test helpers are importable, shared model fixtures
(tiny random checkpoints; the default model).

Helpers live in `tests/model_factory.py`; test files import it as `import model_factory` (this folder is
put on sys.path below, whatever pytest's import mode).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

# Before anything imports huggingface_hub: tests must never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without CUDA, Triton kernels run in Triton's interpreter (tests/kernels). The variable must be set
# before `triton` itself is first imported: triton's own @jit library functions (tl.sigmoid, ...)
# are decorated at that import, and compiled-mode ones cannot be called from interpreted kernels.
# Set here, in the root conftest, because any test folder collected earlier may import triton.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

# A fresh GGUF metadata cache per test session (inherited by server/worker subprocesses): the
# first default-model load exercises the real GGUF path, later ones the cache.
if "PAGODA_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["PAGODA_CACHE_DIR"] = tempfile.mkdtemp(prefix="pagoda-test-cache-")
sys.path.insert(0, str(Path(__file__).parent))

import model_factory  # noqa: E402
import pytest  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Tiny checkpoints (model_factory), session-scoped: each spec is written once per test session.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_checkpoint(TinyModelSpec(...))` -> a Hugging Face checkpoint directory (built once per spec).

    Treat the directory as read-only: other tests share it.
    """
    built: dict[model_factory.TinyModelSpec, Path] = {}

    def build(spec: model_factory.TinyModelSpec = model_factory.TinyModelSpec()) -> Path:
        if spec not in built:
            built[spec] = model_factory.save_tiny_model(tmp_path_factory.mktemp(spec.slug), spec)
        return built[spec]

    return build


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint, tmp_path_factory) -> Callable[..., Path]:
    """`tiny_gguf(TinyModelSpec(...), "F32" | "F16" | "Q8_0" | ...)` -> a `.gguf` file converted from it."""
    built: dict[tuple[model_factory.TinyModelSpec, str], Path] = {}

    def build(spec: model_factory.TinyModelSpec = model_factory.TinyModelSpec(), tensor_type: str = "F32") -> Path:
        if (spec, tensor_type) not in built:
            directory = tmp_path_factory.mktemp(f"{spec.slug}-gguf")
            built[spec, tensor_type] = model_factory.write_tiny_gguf(
                tiny_checkpoint(spec), directory / f"{spec.slug}-{tensor_type}.gguf", tensor_type
            )
        return built[spec, tensor_type]

    return build


# --------------------------------------------------------------------------------------------------
# The default model (SmolLM2-135M-Instruct Q4_1 GGUF), session-scoped: each costs seconds to load, so
# tests using these are marked @pytest.mark.slow.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_source():
    from pagoda.engine.model_loader.model_source import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def default_hf_config(default_source):
    from pagoda.engine.model_loader.model_source import load_hf_config

    return load_hf_config(default_source)


@pytest.fixture(scope="session")
def default_tokenizer(default_source):
    from pagoda.engine.processing.tokenizer import load_tokenizer

    return load_tokenizer(default_source)
