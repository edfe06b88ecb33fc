"""Tuned launch tables of the Triton kernels: which GPU this is, where a kernel family's tables live,
reading a table once, and which entry a call takes.

A kernel family (moe, weight_only, fp8) tuned by its bench/tune_<family>.py keeps its tables in
kernels/<family>_configs/, one JSON file per GPU model, named after torch's name for the GPU with
spaces (and path separators) as underscores:

    <GPU>.json                 the shape is a key inside the file   (weight_only, fp8)
    <key>,device=<GPU>.json    one file per shape                   (moe: key "E=..,N=..,H=..")

Inside, configs are keyed by batch rows M (JSON object keys, so strings); a call of M rows takes the
entry of the smallest tuned M at or above its own (`at_or_above`): the tuner measured that many rows,
and the launch shape for more rows is the safer guess for fewer (more programs, the same tiles).
What an entry holds and what happens past the table's end is each family's own choice.

NOTE: a table is read once per file (per family, key and GPU), on first use; the families cache their
lookups per shape on top, so a call costs a dictionary lookup. A tuner that rewrites a file calls
`read_table.cache_clear()` (and its family's lookup cache) so that the same process sees the new entries.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

import torch

KERNELS_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


def device_name(device: torch.device) -> str:
    """torch's name for the GPU (e.g. "NVIDIA H100 80GB HBM3"); "cpu" off CUDA (the interpreter)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def file_safe(name: str) -> str:
    """A GPU name as table file names spell it: spaces and path separators as underscores."""
    # NOTE: only characters that used to be kept are kept: tables already written stay found
    return name.replace(" ", "_").replace("/", "_").replace("\\", "_")


def config_dir(family: str) -> Path:
    """The folder of one kernel family's tables: kernels/<family>_configs."""
    return KERNELS_DIR / f"{family}_configs"


def table_file(family: str, device: str, key: str = "", directory: Optional[Path] = None) -> Path:
    """The table of `family` on the GPU named `device`, for one shape `key` where the family keeps a
    file per shape; under `directory` instead of the family's folder when given (tests, tuner output)."""
    folder = Path(directory) if directory is not None else config_dir(family)
    return folder / (f"{key},device={file_safe(device)}.json" if key else f"{file_safe(device)}.json")


@functools.lru_cache(maxsize=None)
def read_table(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, read once; {} when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict):
        raise ValueError(f"tuned table {path} must hold a JSON object, got {type(table).__name__}")
    return table


def load_table(family: str, device: str, key: str = "", directory: Optional[Path] = None) -> dict[str, Any]:
    """`read_table` of `table_file(family, device, key, directory)`."""
    return read_table(table_file(family, device, key, directory))


def at_or_above(per_m: Optional[Mapping[Any, T]], m: int) -> Optional[T]:
    """The entry of the smallest tuned M >= m in {M: entry} (M as int or decimal string), else None."""
    if not per_m:
        return None
    fitting = [(int(tuned), entry) for tuned, entry in per_m.items() if int(tuned) >= m]
    return min(fitting, key=lambda pair: pair[0])[1] if fitting else None


def largest(per_m: Mapping[Any, T]) -> T:
    """The entry of the largest tuned M (for families that keep it past the table's end)."""
    return per_m[max(per_m, key=int)]


def write_table(path: Path, table: Mapping[str, Any]) -> None:
    """Writes {M: entry} or {shape: {M: entry}} with one line per entry (M in numeric order, shapes
    sorted), so that a retuned GPU's diff shows which entries moved; then forgets the cached copy."""
    def by_m(per_m: Mapping[str, Any]) -> dict[str, Any]:
        return dict(sorted(per_m.items(), key=lambda item: int(item[0])))

    if all(key.isdigit() for key in table):
        lines = [f" {json.dumps(m)}: {json.dumps(entry)}" for m, entry in by_m(table).items()]
    else:
        lines = [f" {json.dumps(shape)}: {json.dumps(by_m(table[shape]))}" for shape in sorted(table)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    read_table.cache_clear()
