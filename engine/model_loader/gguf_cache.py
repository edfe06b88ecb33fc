"""An on-disk cache of what transformers derives from a GGUF file's metadata (config, tokenizer).

Reading them from the GGUF takes seconds each time (the metadata holds the whole vocabulary and
merge table, parsed entry by entry), and an engine reads them in every process: the engine, every
TP worker, every server restart. The first read saves them with `save_pretrained` into
`$PAGODA_CACHE_DIR` (default `~/.cache/pagoda`) under a key of the file's absolute path, size and
modification time; later reads load the saved files, which is fast. A cache that cannot be
written (read-only home) is skipped silently: it only costs time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

_FORMAT_VERSION = "1"


def cache_root() -> Path:
    return Path(os.environ.get("PAGODA_CACHE_DIR") or Path.home() / ".cache" / "pagoda")


def _entry_dir(gguf_file: Path, kind: str) -> Path:
    stat = gguf_file.stat()
    key = f"{_FORMAT_VERSION}|{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_root() / "gguf" / digest / kind


def cached(gguf_file: Path, kind: str, load_saved: Callable[[Path], T], build: Callable[[], T],
           save: Callable[[T, Path], None]) -> T:
    """`load_saved(dir)` if a complete entry exists, else `build()` then `save(value, dir)`."""
    directory = _entry_dir(gguf_file, kind)
    if (directory / ".complete").exists():
        try:
            return load_saved(directory)
        except Exception:  # a stale or damaged entry: rebuild it
            shutil.rmtree(directory, ignore_errors=True)
    value = build()
    _try_save(value, directory, save)
    return value


def _try_save(value: T, directory: Path, save: Callable[[T, Path], None]) -> Optional[Path]:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".staging-"))
        save(value, staging)
        (staging / ".complete").touch()
        try:
            staging.rename(directory)         # atomic: readers see a whole entry or none
        except OSError:                       # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
        return directory
    except OSError:
        return None
