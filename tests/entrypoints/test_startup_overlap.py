"""AsyncEngine loads the tokenizer on a thread while its engine core starts: a tokenizer that fails
to load still fails the constructor, with its own error, and leaves no core (thread or process)
running behind it."""
from __future__ import annotations

import multiprocessing
import shutil
import threading
import time

import pytest

from pagoda.engine import EngineArgs
from pagoda.engine.async_engine import AsyncEngine


@pytest.fixture
def broken_tokenizer_dir(tiny_model_dir, tmp_path):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "broken-tokenizer")
    (directory / "tokenizer.json").write_text("{ not json")
    return directory


def core_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "pagoda-engine" and thread.is_alive()]


@pytest.mark.parametrize("core_process", [False, True])
def test_a_tokenizer_that_fails_stops_the_core_it_overlapped(broken_tokenizer_dir, core_process):
    config = EngineArgs(model=str(broken_tokenizer_dir), kv_cache_memory_bytes=16 << 20,
                        engine_core_process=core_process).create_config()
    threads_before = core_threads()
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        AsyncEngine(config)
    deadline = time.monotonic() + 10
    while (core_threads() != threads_before or multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert core_threads() == threads_before
    assert multiprocessing.active_children() == []
