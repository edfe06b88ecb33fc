"""Hugging Face Hub ids (`Qwen/Qwen3-8B`) found in the local Hugging Face cache, never on the network.

vLLM users type a Hub id and expect it to load; pagoda accepts one when the model is already in a
Hugging Face cache on this machine (put there by `huggingface-cli download`, by transformers, by
vLLM, or copied from another machine). The cache's layout, as huggingface_hub writes it:

    <cache>/models--Qwen--Qwen3-8B/
        refs/main                      the commit hash the branch or tag `main` pointed at when fetched
        snapshots/<commit hash>/...    the repository's files at that commit (links into blobs/)
        blobs/<sha256>                 the file contents

Where caches are looked for, first match wins: `--download-dir` (vLLM's flag: a cache folder of that
layout), then `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
`~/.cache/huggingface/hub` (huggingface_hub's own order). A revision is a branch or tag name (read
from `refs/<name>`) or a commit hash (a folder under `snapshots/`; a unique prefix of 7+ characters
works too); the default is `main`.

NOTE: the layout is read directly rather than through huggingface_hub's helpers: reading two small
files is all it takes, nothing here can reach the network whatever the environment says, and a miss
can say exactly which folders were searched.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

DEFAULT_REVISION = "main"

# "org/name" as the Hub allows it: letters, digits, '-', '_', '.'; no '--' or '..' (they would
# make the cache folder name ambiguous or climb out of the cache).
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")


def is_hub_id(model: str) -> bool:
    """Whether `model` has the shape of a Hub repository id ("org/name")."""
    return bool(HUB_ID_PATTERN.match(model)) and "--" not in model and ".." not in model


def hub_cache_dirs(download_dir: Optional[str] = None) -> list[Path]:
    """The cache folders searched, in order (whether or not they exist)."""
    dirs: list[Path] = []
    if download_dir:
        dirs.append(Path(download_dir).expanduser())
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub_cache:
        dirs.append(Path(hub_cache).expanduser())
    elif os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    elif os.environ.get("XDG_CACHE_HOME"):
        dirs.append(Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub")
    else:
        dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    unique: list[Path] = []
    for directory in dirs:
        if directory not in unique:
            unique.append(directory)
    return unique


def repo_folder_name(repo_id: str) -> str:
    """The cache folder of a model repository: 'Qwen/Qwen3-8B' -> 'models--Qwen--Qwen3-8B'."""
    return "models--" + repo_id.replace("/", "--")


def find_cached_snapshot(repo_id: str, revision: Optional[str] = None, download_dir: Optional[str] = None) -> Path:
    """The snapshot folder of `repo_id` at `revision` in the first cache that holds it.

    ValueError when none does: it names the id, the revision, the folders searched, what the cache
    holds of that repository (if anything) and how to fetch it.
    """
    revision = revision or DEFAULT_REVISION
    _check_revision(revision)
    searched: list[str] = []
    found_elsewhere: list[str] = []
    for cache in hub_cache_dirs(download_dir):
        repo_dir = cache / repo_folder_name(repo_id)
        searched.append(str(repo_dir))
        if not repo_dir.is_dir():
            continue
        snapshot = _snapshot_at(repo_dir, revision)
        if snapshot is not None:
            return snapshot
        found_elsewhere.append(_describe_cached(repo_dir))
    held = f" The cache holds other revisions of it: {'; '.join(found_elsewhere)}." if found_elsewhere else ""
    revision_flag = "" if revision == DEFAULT_REVISION else f" --revision {revision}"
    raise ValueError(
        f"model {repo_id!r} is neither a local path nor in the local Hugging Face cache at revision {revision!r} "
        f"(searched: {', '.join(searched)}).{held} pagoda loads local paths only (a checkpoint directory, a "
        f".gguf file, or a Hub id already in the cache) and never downloads: on a machine with a network run "
        f"`huggingface-cli download {repo_id}{revision_flag}` and copy its cache folder "
        f"({repo_folder_name(repo_id)}) into one of the folders above, or point HF_HUB_CACHE, HF_HOME or "
        f"--download-dir at a cache that holds it")


def _check_revision(revision: str) -> None:
    # NOTE: the revision becomes part of a path under refs/: nothing that climbs out of it
    if not isinstance(revision, str) or not re.fullmatch(r"[\w.\-/]+", revision) or revision.startswith("/") \
            or ".." in revision.split("/"):
        raise ValueError(f"revision must be a branch or tag name or a commit hash, got {revision!r}")


def _snapshot_at(repo_dir: Path, revision: str) -> Optional[Path]:
    """`refs/<revision>` -> its snapshot; else a commit hash (or unique prefix) under snapshots/."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        snapshot = snapshots / commit
        # NOTE: a ref whose snapshot is gone (a cache cleaned by hand) is no match; the error
        # then lists what the cache still holds.
        return snapshot if commit and snapshot.is_dir() else None
    if _COMMIT_PREFIX.match(revision) and snapshots.is_dir():
        matches = [entry for entry in snapshots.iterdir() if entry.is_dir() and entry.name.startswith(revision)]
        if len(matches) == 1:
            return matches[0]
    return None


def _describe_cached(repo_dir: Path) -> str:
    """'refs main, v1.0; snapshots 1a2b3c4' for an error message."""
    refs_dir = repo_dir / "refs"
    refs = sorted(str(ref.relative_to(refs_dir)) for ref in refs_dir.rglob("*") if ref.is_file()) \
        if refs_dir.is_dir() else []
    snapshots_dir = repo_dir / "snapshots"
    snapshots = sorted(entry.name[:12] for entry in snapshots_dir.iterdir() if entry.is_dir()) \
        if snapshots_dir.is_dir() else []
    return (f"{repo_dir} has refs {', '.join(refs) or '(none)'} and snapshots "
            f"{', '.join(snapshots) or '(none)'}")
