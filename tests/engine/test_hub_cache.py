"""Hub ids resolved from a local Hugging Face cache (hub_cache.py through resolve_model), never the network.

Each test lays out a cache in tmp_path as huggingface_hub writes one (refs/<name> holding a commit
hash, snapshots/<hash>/ whose files link into blobs/) around the tiny random checkpoint or GGUF file.
"""
from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import pytest

from pagoda.engine import EngineArgs, LLM, SamplingParams
from pagoda.engine.model_loader.hub_cache import hub_cache_dirs
from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model

REPO = "acme/tiny-chat"
MAIN = "1" * 40
V2 = "2" * 40
_CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def add_snapshot(cache: Path, repo_id: str, files: list[Path], commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Puts `files` into `cache` as huggingface_hub does: content in blobs/, linked from the snapshot."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for file in files:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def checkpoint_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


@pytest.fixture(autouse=True)
def no_cache_variables(monkeypatch, tmp_path):
    """Each test names its caches itself; the real home holds none."""
    for name in _CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def no_network(monkeypatch):
    """Any connection to, or name lookup of, a host beyond this machine fails the test."""
    local = (None, "", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost")

    def check(host) -> None:
        if (host.decode() if isinstance(host, bytes) else host) not in local:
            raise AssertionError(f"network access attempted: {host!r}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo, real_create_connection = socket.getaddrinfo, socket.create_connection

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(address[0])
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(address[0])
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        check(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        check(address[0])
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)


def test_the_network_guard_works(no_network):
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.getaddrinfo("huggingface.co", 443)


# ----------------------------------------------------------------------------------- where to look


def test_cache_folder_order(monkeypatch, tmp_path):
    assert hub_cache_dirs() == [tmp_path / "home" / ".cache" / "huggingface" / "hub"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dirs() == [tmp_path / "xdg" / "huggingface" / "hub"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hub_cache_dirs() == [tmp_path / "hf-home" / "hub"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert hub_cache_dirs(str(tmp_path / "dl")) == [tmp_path / "dl", tmp_path / "hub-cache"]


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME", "home"])
def test_hub_id_resolves_from_the_cache(where, tiny_checkpoint, monkeypatch, tmp_path, no_network):
    if where == "HF_HUB_CACHE":
        cache = tmp_path / "hub-cache"
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    elif where == "HF_HOME":
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        cache = tmp_path / "hf-home" / "hub"
    else:
        cache = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    snapshot = add_snapshot(cache, REPO, checkpoint_files(tiny_checkpoint()), MAIN)

    source = resolve_model(REPO)
    assert source.path == snapshot.resolve()
    assert source.gguf_file is None and source.name == REPO
    assert load_hf_config(source).architectures == ["LlamaForCausalLM"]


def test_download_dir_is_searched_first_then_the_cache(tiny_checkpoint, monkeypatch, tmp_path):
    files = checkpoint_files(tiny_checkpoint())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    in_cache = add_snapshot(tmp_path / "hub-cache", REPO, files, MAIN)
    in_download_dir = add_snapshot(tmp_path / "downloads", REPO, files, V2)

    assert resolve_model(REPO, download_dir=str(tmp_path / "downloads")).path == in_download_dir.resolve()
    assert resolve_model(REPO, download_dir=str(tmp_path / "empty")).path == in_cache.resolve()
    assert resolve_model(REPO).path == in_cache.resolve()


def test_revision_by_branch_and_by_commit(tiny_checkpoint, monkeypatch, tmp_path):
    files = checkpoint_files(tiny_checkpoint())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    main = add_snapshot(tmp_path / "hub-cache", REPO, files, MAIN, refs=("main",))
    v2 = add_snapshot(tmp_path / "hub-cache", REPO, files, V2, refs=("v2.0",))

    assert resolve_model(REPO).path == main.resolve()
    assert resolve_model(REPO, revision="main").path == main.resolve()
    assert resolve_model(REPO, revision="v2.0").path == v2.resolve()
    assert resolve_model(REPO, revision=V2).path == v2.resolve()              # a commit hash
    assert resolve_model(REPO, revision=V2[:7]).path == v2.resolve()          # its short form


def test_unknown_revision_lists_what_the_cache_holds(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    add_snapshot(tmp_path / "hub-cache", REPO, checkpoint_files(tiny_checkpoint()), MAIN)
    with pytest.raises(ValueError) as raised:
        resolve_model(REPO, revision="v9")
    message = str(raised.value)
    assert f"{REPO!r}" in message and "revision 'v9'" in message
    assert "refs main" in message and MAIN[:12] in message
    assert f"huggingface-cli download {REPO} --revision v9" in message


@pytest.mark.parametrize("revision", ["../../etc", "/abs", "a b", ""])
def test_bad_revision_is_refused(revision, tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    add_snapshot(tmp_path / "hub-cache", REPO, checkpoint_files(tiny_checkpoint()), MAIN)
    if revision == "":             # empty = the default revision, as None
        assert resolve_model(REPO, revision=revision).name == REPO
        return
    with pytest.raises(ValueError, match="revision must be a branch or tag name or a commit hash"):
        resolve_model(REPO, revision=revision)


def test_not_cached_names_id_revision_folders_and_the_fetch_command(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ValueError) as raised:
        resolve_model("Qwen/Qwen3-8B", download_dir=str(tmp_path / "downloads"))
    message = str(raised.value)
    assert "'Qwen/Qwen3-8B'" in message and "revision 'main'" in message
    assert str(tmp_path / "downloads" / "models--Qwen--Qwen3-8B") in message
    assert str(tmp_path / "hub-cache" / "models--Qwen--Qwen3-8B") in message
    assert "huggingface-cli download Qwen/Qwen3-8B`" in message
    assert "never downloads" in message


def test_a_local_path_wins_over_the_cache(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    add_snapshot(tmp_path / "hub-cache", REPO, checkpoint_files(tiny_checkpoint()), MAIN)
    local = tmp_path / "work" / REPO
    shutil.copytree(tiny_checkpoint(), local)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model(REPO).path == local.resolve()


def test_incomplete_snapshot_says_how_to_complete_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    readme = tmp_path / "README.md"
    readme.write_text("a model card")
    add_snapshot(tmp_path / "hub-cache", REPO, [readme], MAIN)
    with pytest.raises(ValueError, match=rf"neither config\.json.*huggingface-cli download {REPO}"):
        resolve_model(REPO)


# ------------------------------------------------------------------------------------------- GGUF


def test_gguf_repository_resolves_to_its_one_file(tiny_gguf, monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    readme = tmp_path / "README.md"
    readme.write_text("a model card")
    snapshot = add_snapshot(tmp_path / "hub-cache", "acme/tiny-GGUF", [tiny_gguf(), readme], MAIN)

    source = resolve_model("acme/tiny-GGUF")
    # NOTE: the snapshot's link keeps its name (blobs/ holds hash-named files) and its folder
    assert source.gguf_file == snapshot.resolve() / tiny_gguf().name
    assert source.path == snapshot.resolve()
    assert load_hf_config(source).architectures == ["LlamaForCausalLM"]


def test_a_linked_gguf_file_keeps_its_name(tiny_gguf, tmp_path):
    snapshot = add_snapshot(tmp_path / "hub-cache", "acme/tiny-GGUF", [tiny_gguf()], MAIN)
    linked = snapshot / tiny_gguf().name
    source = resolve_model(str(linked))
    assert linked.resolve().suffix == ""                          # the blob it links to
    assert source.gguf_file == snapshot.resolve() / tiny_gguf().name and source.path == snapshot.resolve()


def test_gguf_repository_with_several_files_lists_them(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    quantized = tmp_path / "tiny-Q8_0.gguf"
    shutil.copyfile(tiny_gguf(), tmp_path / "tiny-F32.gguf")
    quantized.write_bytes(tiny_gguf().read_bytes() + b"\0")        # another blob
    add_snapshot(tmp_path / "hub-cache", "acme/tiny-GGUF", [tmp_path / "tiny-F32.gguf", quantized], MAIN)
    with pytest.raises(ValueError, match=r"'acme/tiny-GGUF'.*2 \.gguf files \(tiny-F32\.gguf, tiny-Q8_0\.gguf\)"
                                         r".*pass the path of the one \.gguf file"):
        resolve_model("acme/tiny-GGUF")


# --------------------------------------------------------------------------------- through the engine


def test_engine_args_revision_and_download_dir(tiny_checkpoint, tmp_path):
    files = checkpoint_files(tiny_checkpoint())
    add_snapshot(tmp_path / "downloads", REPO, files, MAIN)
    v2 = add_snapshot(tmp_path / "downloads", REPO, files, V2, refs=("v2.0",))
    config = EngineArgs(model=REPO, revision="v2.0", download_dir=str(tmp_path / "downloads"),
                        device="cpu").create_config()
    assert config.model.source.path == v2.resolve()
    assert config.model.served_model_name == REPO                 # what the user typed


def test_offline_llm_by_hub_id_without_network(tiny_checkpoint, monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    add_snapshot(tmp_path / "hf-home" / "hub", REPO, checkpoint_files(tiny_checkpoint()), MAIN)
    llm = LLM(model=REPO, device="cpu", kv_cache_memory_bytes=4 << 20)
    try:
        outputs = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                               use_tqdm=False)
        assert len(outputs[0].outputs[0].token_ids) == 3
        assert llm.engine.config.model.served_model_name == REPO
    finally:
        llm.shutdown()
