"""Fixtures of the server tests: a tiny long-context checkpoint and the shared server.

Every server is a real process on 127.0.0.1 with free ports, started once per configuration
(`main_server` is shared by the whole session) and stopped at the end. This folder is a package so
that its conftest does not collide with other folders' `conftest` modules.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

import model_factory

from .server_helpers import API_KEY, MAX_POSITION_EMBEDDINGS, ServerProcess, start_server


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """In-process engines of this folder run with one torch thread (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny llama checkpoint (tokenizer with ChatML template) whose context is 8192 tokens."""
    directory = model_factory.save_tiny_model(tmp_path_factory.mktemp("tiny-long"), model_factory.TinyModelSpec())
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = MAX_POSITION_EMBEDDINGS
    config_path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def inprocess_engine(tiny_model_dir):
    """An AsyncEngine on the tiny model in this process (apps are built around it with `build_app`)."""
    from pagoda.engine import EngineArgs
    from pagoda.engine.async_engine import AsyncEngine

    from .server_helpers import MODEL_NAME

    config = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20,
                        served_model_name=MODEL_NAME).create_config()
    engine = AsyncEngine(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def main_server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """The shared server: API key, gRPC, a 1 MiB body limit, room for 128 concurrent sequences."""
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--max-num-seqs", "128",
                          "--max-request-body-bytes", "1MiB", grpc=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(main_server):
    import openai

    return openai.OpenAI(base_url=f"{main_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def async_client_factory(main_server):
    import openai

    def make():
        return openai.AsyncOpenAI(base_url=f"{main_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    return make
