"""The model's generation defaults (generation_config.json, `--generation-config auto|vllm|PATH`): read and
checked at start-up, merged under each request's own fields (GenerationDefaults.merge), and applied by
the OpenAI routes (`build_app` around an in-process engine on a tiny model whose file states defaults)
and by the offline LLM when it gets no SamplingParams.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagoda.engine import LLM, EngineArgs, SamplingParams
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.openai.chat_messages import ChatCompletionRequest
from pagoda.engine.entrypoints.openai.protocol import CompletionRequest
from pagoda.engine.entrypoints.openai.request_to_params import generation_defaults_of, to_sampling_params
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.generation_defaults import GenerationDefaults, load_generation_defaults

from .server_helpers import MODEL_NAME, start_server

QWEN3_STYLE = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.95,
               "top_k": 20, "transformers_version": "5.25.0"}
STATED = GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20)


def write_config(directory: Path, content: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "generation_config.json"
    file.write_text(content if isinstance(content, str) else json.dumps(content))
    return file


def with_defaults(checkpoint: Path, directory: Path, content: Any = QWEN3_STYLE) -> Path:
    """A copy of `checkpoint` whose generation_config.json is `content`."""
    shutil.copytree(checkpoint, directory)
    write_config(directory, content)
    return directory


def values(defaults: GenerationDefaults) -> dict[str, Any]:
    return defaults.values()


# ------------------------------------------------------------------------------------- reading the file


def test_auto_reads_the_models_file(tmp_path):
    write_config(tmp_path, {**QWEN3_STYLE, "min_p": 0.05, "repetition_penalty": 1.05, "max_new_tokens": 2048})
    defaults = load_generation_defaults("auto", tmp_path)
    assert values(defaults) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                                "repetition_penalty": 1.05, "max_tokens": 2048}
    assert defaults.source == str((tmp_path / "generation_config.json").resolve())
    assert defaults.describe() == ("temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.05, "
                                   "max_new_tokens=2048")


def test_auto_without_a_file_or_without_sampling_keys_states_nothing(tmp_path):
    assert not load_generation_defaults("auto", tmp_path)
    write_config(tmp_path, {"bos_token_id": 1, "eos_token_id": 2, "temperature": None, "transformers_version": "5"})
    assert not load_generation_defaults("auto", tmp_path)


def test_vllm_ignores_the_file(tmp_path):
    write_config(tmp_path, QWEN3_STYLE)
    assert load_generation_defaults("vllm", tmp_path) == GenerationDefaults()


def test_path_names_a_folder_or_the_file(tmp_path):
    write_config(tmp_path / "model", {"temperature": 1.0})
    other = write_config(tmp_path / "elsewhere", {"temperature": 0.2, "top_k": 5})
    assert values(load_generation_defaults(str(tmp_path / "elsewhere"), tmp_path / "model")) == \
        {"temperature": 0.2, "top_k": 5}
    assert values(load_generation_defaults(str(other), tmp_path / "model")) == {"temperature": 0.2, "top_k": 5}


@pytest.mark.parametrize("where, message", [("missing", "which does not exist"),
                                            ("empty", "which has no generation_config.json")])
def test_path_without_the_file_is_refused(where, message, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"generation_config must be 'auto', 'vllm' or a folder.*{where}.*{message}"):
        load_generation_defaults(str(tmp_path / where), tmp_path)


@pytest.mark.parametrize("key, value, rule", [
    ("temperature", -1, r"a number >= 0"),
    ("temperature", "0.7", r"a number >= 0"),
    ("temperature", True, r"a number >= 0"),
    ("top_p", 0, r"a number in \(0, 1\]"),
    ("top_p", 1.5, r"a number in \(0, 1\]"),
    ("top_k", 2.5, r"an integer >= -1"),
    ("top_k", -3, r"an integer >= -1"),
    ("min_p", 2, r"a number in \[0, 1\]"),
    ("repetition_penalty", 0, r"a number > 0"),
    ("max_new_tokens", 0, r"an integer >= 1"),
    ("max_new_tokens", 10.5, r"an integer >= 1"),
])
def test_bad_values_are_refused_by_name(key, value, rule, tmp_path):
    file = write_config(tmp_path, {**QWEN3_STYLE, key: value})
    with pytest.raises(ValueError) as raised:
        load_generation_defaults("auto", tmp_path)
    message = str(raised.value)
    assert f"{key} must be" in message and repr(value) in message and str(file.resolve()) in message
    assert "--generation-config vllm" in message
    assert re.search(rule, message), message


@pytest.mark.parametrize("content, problem", [("{not json", "cannot be read as JSON"),
                                              ("[1, 2]", "must hold a JSON object, got list"),
                                              ('{"temperature": NaN}', "temperature must be a number")])
def test_unreadable_files_are_refused(content, problem, tmp_path):
    write_config(tmp_path, content)
    with pytest.raises(ValueError, match=problem):
        load_generation_defaults("auto", tmp_path)


def test_start_up_refuses_a_bad_file_and_logs_good_defaults(tiny_checkpoint, tmp_path, caplog):
    bad = with_defaults(tiny_checkpoint(), tmp_path / "bad", {"temperature": -1})
    with pytest.raises(ValueError, match=r"temperature must be a number >= 0, got -1"):
        EngineArgs(model=str(bad), device="cpu").create_config()
    EngineArgs(model=str(bad), device="cpu", generation_config="vllm").create_config()     # ignored: starts

    good = with_defaults(tiny_checkpoint(), tmp_path / "good")
    with caplog.at_level(logging.INFO, logger="pagoda.engine.generation_defaults"):
        config = EngineArgs(model=str(good), device="cpu").create_config()
    assert config.model.generation_defaults == GenerationDefaults(**values(STATED),
                                                                  source=str(good.resolve() / "generation_config.json"))
    lines = [r.getMessage() for r in caplog.records if "generation defaults" in r.getMessage()]
    assert lines == ["using the model's generation defaults: temperature=0.6, top_p=0.95, top_k=20 "
                     "(--generation-config vllm to ignore)"]


def test_gguf_reads_the_file_beside_it(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf(), tmp_path / "model.gguf")
    write_config(tmp_path, {"temperature": 0.3})
    config = EngineArgs(model=str(tmp_path / "model.gguf"), device="cpu").create_config()
    assert values(config.model.generation_defaults) == {"temperature": 0.3}


# ----------------------------------------------------------------------------------------- the merge


def test_merge_request_wins_unset_takes_the_default_neither_is_left_out():
    defaults = GenerationDefaults(temperature=0.6, top_k=20)
    assert defaults.merge({"temperature": None, "top_p": None, "top_k": None}) == {"temperature": 0.6, "top_k": 20}
    assert defaults.merge({"temperature": 1.0, "top_p": 0.5, "top_k": -1}) == {"temperature": 1.0, "top_p": 0.5,
                                                                              "top_k": -1}
    assert defaults.merge({"temperature": 0.0}) == {"temperature": 0.0, "top_k": 20}     # 0 is set, not unset
    assert GenerationDefaults().merge({"min_p": None}) == {}
    with pytest.raises(ValueError, match=r"got \['seed'\]"):
        defaults.merge({"seed": 3})


def test_output_budget_and_the_offline_default_params():
    assert GenerationDefaults().output_budget(100) == 100
    assert GenerationDefaults(max_tokens=64).output_budget(100) == 64
    assert GenerationDefaults(max_tokens=64).output_budget(10) == 10          # never more than fits
    assert GenerationDefaults().sampling_params() == SamplingParams()
    params = GenerationDefaults(temperature=0.6, max_tokens=64).sampling_params()
    assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 1.0, None)


@pytest.mark.parametrize("request_type, body", [(CompletionRequest, {"prompt": "x"}),
                                                (ChatCompletionRequest, {"messages": [{"role": "user",
                                                                                       "content": "x"}]})])
def test_to_sampling_params_merges_the_defaults(request_type, body):
    unset = to_sampling_params(request_type.model_validate(body), 8, None, defaults=STATED)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p, unset.repetition_penalty) == \
        (0.6, 0.95, 20, 0.0, 1.0)
    explicit = to_sampling_params(request_type.model_validate({**body, "temperature": 1.0, "top_k": -1}), 8, None,
                                  defaults=STATED)
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (1.0, 0.95, 0)
    plain = to_sampling_params(request_type.model_validate(body), 8, None)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)


def test_a_client_without_defaults_gets_none():
    assert generation_defaults_of(object()) == GenerationDefaults()


# ---------------------------------------------------------------------------------- through the server


class RecordingClient:
    """The in-process engine as the app sees it, recording the SamplingParams each request reaches it with."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.params: list[SamplingParams] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, prompt, params, request_id, priority=0):
        self.params.append(params)
        return self.engine.generate(prompt, params, request_id, priority)


@pytest.fixture(scope="module")
def stated_engine(tiny_model_dir, tmp_path_factory):
    """An AsyncEngine on the tiny model whose generation_config.json states Qwen3-style defaults."""
    directory = with_defaults(tiny_model_dir, tmp_path_factory.mktemp("stated") / "model")
    engine = AsyncEngine(EngineArgs(model=str(directory), kv_cache_memory_bytes=16 << 20,
                                    served_model_name=MODEL_NAME).create_config())
    yield engine
    engine.shutdown()


def post(client: RecordingClient, path: str, body: dict[str, Any]) -> httpx.Response:
    async def main() -> httpx.Response:
        app = build_app(client, ServerSettings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.post(path, json=body, timeout=60)

    return asyncio.run(main())


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}),
])
def test_http_requests_get_the_models_defaults_where_unset(stated_engine, path, body):
    client = RecordingClient(stated_engine)
    assert post(client, path, body).status_code == 200
    assert post(client, path, {**body, "temperature": 0.0, "top_p": 1.0, "min_p": 0.1}).status_code == 200
    unset, explicit = client.params
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p) == (0.6, 0.95, 20, 0.0)
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.min_p) == (0.0, 1.0, 20, 0.1)


def test_the_engine_client_states_its_models_defaults(stated_engine, inprocess_engine):
    assert stated_engine.generation_defaults == stated_engine.config.model.generation_defaults
    assert values(stated_engine.generation_defaults) == values(STATED)
    assert not inprocess_engine.generation_defaults          # its file states no sampling


def test_http_chat_without_max_tokens_stops_at_max_new_tokens(tiny_model_dir, tmp_path):
    directory = with_defaults(tiny_model_dir, tmp_path / "model", {"max_new_tokens": 3})
    engine = AsyncEngine(EngineArgs(model=str(directory), kv_cache_memory_bytes=16 << 20,
                                    served_model_name=MODEL_NAME).create_config())
    try:
        chat = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "ignore_eos": True}
        unset = post(RecordingClient(engine), "/v1/chat/completions", chat)
        assert unset.status_code == 200 and unset.json()["usage"]["completion_tokens"] == 3
        given = post(RecordingClient(engine), "/v1/chat/completions", {**chat, "max_tokens": 5})
        assert given.json()["usage"]["completion_tokens"] == 5           # a max_tokens set is no default
    finally:
        engine.shutdown()


def test_pagoda_serve_a_cached_hub_id_with_its_defaults(tiny_model_dir, tmp_path):
    """`pagoda serve acme/tiny --download-dir DIR`: found in that cache, its defaults logged and served."""
    commit = "1" * 40
    repo = tmp_path / "cache" / "models--acme--tiny"
    with_defaults(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    server = start_server(Path("acme/tiny"), tmp_path, "--download-dir", str(tmp_path / "cache"), api_key=None)
    try:
        assert "using the model's generation defaults: temperature=0.6, top_p=0.95, top_k=20 " \
               "(--generation-config vllm to ignore)" in server.log()
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    finally:
        server.stop()


def test_http_requests_without_defaults_get_openais(inprocess_engine):
    client = RecordingClient(inprocess_engine)           # its generation_config.json states no sampling
    assert post(client, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}).status_code == 200
    (params,) = client.params
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)


# --------------------------------------------------------------------------------------- offline LLM


def test_offline_llm_uses_the_defaults_only_without_sampling_params(tiny_checkpoint, tmp_path):
    directory = with_defaults(tiny_checkpoint(), tmp_path / "model", {"temperature": 0.0})
    llm = LLM(model=str(directory), device="cpu", kv_cache_memory_bytes=4 << 20)
    try:
        default = llm.get_default_sampling_params()
        assert (default.temperature, default.max_tokens) == (0.0, 16)
        prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 10]}]
        greedy = llm.generate(prompts, SamplingParams(temperature=0.0), use_tqdm=False)
        unset = llm.generate(prompts, use_tqdm=False)         # the file's temperature 0: greedy as well
        assert [o.outputs[0].token_ids for o in unset] == [o.outputs[0].token_ids for o in greedy]
        # a SamplingParams passed is used as given (pagoda's temperature 1 samples, with this seed)
        given = llm.generate(prompts, SamplingParams(seed=7), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in given] != [o.outputs[0].token_ids for o in greedy]
    finally:
        llm.shutdown()


def test_max_new_tokens_bounds_requests_that_set_no_max_tokens(tiny_checkpoint, tmp_path):
    directory = with_defaults(tiny_checkpoint(), tmp_path / "model", {"max_new_tokens": 5})
    llm = LLM(model=str(directory), device="cpu", kv_cache_memory_bytes=4 << 20, max_model_len=64)
    try:
        unset = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        short, long = llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(3, 64))}],
                                   unset, use_tqdm=False)
        assert len(short.outputs[0].token_ids) == 5
        assert len(long.outputs[0].token_ids) == 3                # no more than the prompt leaves room for
        (default,) = llm.generate([{"prompt_token_ids": [5, 6, 7]}], use_tqdm=False)
        assert len(default.outputs[0].token_ids) <= 5
    finally:
        llm.shutdown()


def test_cli_flags_reach_engine_args():
    import argparse

    from pagoda.engine.entrypoints.cli_args import add_engine_flags, engine_args_from

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_engine_flags(parser)
    args = engine_args_from(parser.parse_args(["Qwen/Qwen3-8B", "--revision", "v2", "--download-dir", "/models",
                                               "--generation-config", "vllm"]))
    assert (args.model, args.revision, args.download_dir, args.generation_config) == \
        ("Qwen/Qwen3-8B", "v2", "/models", "vllm")
    defaults = engine_args_from(parser.parse_args(["m"]))
    assert (defaults.revision, defaults.download_dir, defaults.generation_config) == (None, None, "auto")


def test_grpc_options_merge_the_defaults():
    from pagoda.engine.entrypoints.grpc import pagoda_pb2
    from pagoda.engine.entrypoints.grpc.server import to_sampling_params as grpc_params

    unset = grpc_params(pagoda_pb2.SamplingOptions(max_tokens=4), STATED)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.max_tokens) == (0.6, 0.95, 20, 4)
    given = grpc_params(pagoda_pb2.SamplingOptions(temperature=0.0, top_k=3), STATED)
    assert (given.temperature, given.top_p, given.top_k) == (0.0, 0.95, 3)


def test_offline_llm_vllm_mode_ignores_the_file(tiny_checkpoint, tmp_path):
    directory = with_defaults(tiny_checkpoint(), tmp_path / "model", {"temperature": 0.0})
    llm = LLM(model=str(directory), device="cpu", kv_cache_memory_bytes=4 << 20, generation_config="vllm")
    try:
        assert llm.get_default_sampling_params() == SamplingParams()
    finally:
        llm.shutdown()
