"""The `pagoda` command: generate (tiny model, and once the real default model), serve's flags, the
hook where the cluster path plugs in and the message when Ray is not installed; plus a smoke run of
bench/serving.py against a server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .server_helpers import MODEL_NAME, subprocess_env

from pagoda.engine.entrypoints import cli, cli_args

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.engine.entrypoints.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())


def test_generate_prints_the_greedy_completion(tiny_model_dir, main_server):
    result = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "Hello world", "--max-tokens", "8",
                     "--kv-cache-memory-bytes", "16MiB")
    assert result.returncode == 0, result.stderr
    served = httpx.post(f"{main_server.url}/v1/completions", headers=main_server.headers, timeout=60, json={
        "model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 8, "temperature": 0}).json()
    assert result.stdout == served["choices"][0]["text"] + "\n"


@pytest.mark.slow
def test_generate_with_the_default_model():
    result = run_cli("generate", "--model", "default", "--chat", "--prompt", "What is the capital of France?",
                     "--max-tokens", "12", "--max-model-len", "512", "--kv-cache-memory-bytes", "64MiB")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_serve_flags_parse_with_vllm_names():
    args = cli.build_parser().parse_args([
        "serve", "some-model", "--standalone", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
        "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "1024", "--block-size", "32",
        "--no-enable-prefix-caching", "--tensor-parallel-size", "1", "--seed", "3", "--served-model-name", "m",
        "--grpc-port", "9001", "--max-queued-requests", "4", "--shutdown-timeout", "2.5",
        "--allowed-origins", '["https://a.example", "https://b.example"]', "--max-request-body-bytes", "2MiB",
        "--kv-cache-memory-bytes", "1GiB", "--device", "cpu", "--dtype", "float32",
        "--scheduling-policy", "priority", "--enable-expert-parallel"])
    engine_args = cli_args.engine_args_from(argparse_model(args))
    assert engine_args.scheduling_policy == "priority" and engine_args.enable_expert_parallel is True
    default = cli_args.engine_args_from(argparse_model(cli.build_parser().parse_args(["serve", "m"])))
    assert default.scheduling_policy == "fcfs" and default.enable_expert_parallel is False
    assert (engine_args.max_model_len, engine_args.max_num_seqs, engine_args.max_num_batched_tokens) == (512, 8, 1024)
    assert engine_args.block_size == 32 and engine_args.enable_prefix_caching is False
    assert engine_args.kv_cache_memory_bytes == 2**30 and engine_args.served_model_name == "m"
    settings = cli_args.server_settings_from(args)
    assert (settings.host, settings.port, settings.grpc_port, settings.api_key) == ("0.0.0.0", 9000, 9001, "k")
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert settings.max_request_body_bytes == 2 * 2**20 and settings.shutdown_timeout_s == 2.5
    assert cli_args.parse_origins("https://a.example, https://b.example") == ["https://a.example", "https://b.example"]
    assert cli_args.parse_bytes("16777216") == cli_args.parse_bytes("16MiB") == 16 * 2**20


def argparse_model(args):
    args.model = args.model_positional
    return args


def test_serve_rejects_bad_values_with_exit_2(tiny_model_dir, capsys):
    assert cli.main(["serve", str(tiny_model_dir), "--standalone", "--block-size", "7"]) == 2
    assert "block_size" in capsys.readouterr().err
    assert cli.main(["serve", "a", "--model", "b", "--standalone"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_serve_without_standalone_uses_the_cluster_hook(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "cluster_entrypoint", lambda: lambda args: calls.append(args.model) or 0)
    standalone = []
    monkeypatch.setattr(cli, "serve_standalone", lambda args: standalone.append(args.model) or 0)
    assert cli.main(["serve", "default"]) == 0
    assert cli.main(["serve", "other", "--standalone"]) == 0
    assert calls == ["default"] and standalone == ["other"]


# Ray missing, simulated in a fresh interpreter before anything imports it: `None` in sys.modules makes
# `import ray` (or `from ray import serve`) fail as if the package were not installed.
_WITHOUT = ("import sys; sys.modules.update(dict.fromkeys({modules!r})); "
            "from pagoda.engine.entrypoints.cli import main; sys.exit(main({argv!r}))")


def _run_without(modules: list[str], argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT.format(modules=modules, argv=argv)], capture_output=True,
                          text=True, timeout=120, env=env)


def _assert_ray_missing_message(result: subprocess.CompletedProcess) -> None:
    before, after = cli.RAY_MISSING_MESSAGE.split("{cause}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.splitlines()                   # one line, nothing logged before it
    assert line.startswith("pagoda: error: " + before) and line.endswith(after), line
    assert "pip install 'pagoda[cluster]'" in line and "--standalone" in line


@pytest.mark.parametrize("module", ["ray", "ray.serve"])
@pytest.mark.parametrize("argv", [["serve", "default"], ["serve", "--model", "default", "--num-replicas", "2"],
                                  ["status"]], ids=["serve", "serve-flags", "status"])
def test_ray_commands_without_ray_say_what_to_install(module, argv):
    result = _run_without([module], argv, subprocess_env())
    _assert_ray_missing_message(result)
    assert f"{module} halted" in result.stderr           # the cause: which module was missing


def test_ray_without_its_serve_extra_gets_the_same_message(tmp_path):
    # A stand-in Ray whose `ray.serve` fails on a dependency that only the `serve` extra installs: the
    # missing module is not Ray's, but the import that fails is in Ray's code.
    (tmp_path / "ray" / "serve").mkdir(parents=True)
    (tmp_path / "ray" / "__init__.py").write_text("")
    (tmp_path / "ray" / "serve" / "__init__.py").write_text("import serve_extra_dependency_not_installed\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    for argv in (["serve", "default"], ["status"]):
        result = _run_without([], argv, env)
        _assert_ray_missing_message(result)
        assert "serve_extra_dependency_not_installed" in result.stderr


def test_other_import_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        import pagoda_module_that_does_not_exist  # noqa: F401

    monkeypatch.setattr(cli, "cluster_entrypoint", lambda: broken)
    with pytest.raises(ModuleNotFoundError, match="pagoda_module_that_does_not_exist"):
        cli.main(["serve", "default"])


def test_bench_serving_smoke(main_server, tmp_path):
    out = tmp_path / "serving.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.serving", "--base-url", main_server.url, "--api-key", "test-key",
         "--workload", "s64", "--vocab-size", "512", "--num-prompts", "4", "--request-rate", "inf", "20",
         "--max-concurrency", "3", "--goodput", "ttft:60000", "e2el:60000", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=subprocess_env())
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert [r["completed"] for r in report["results"]] == [4, 4]
    for run in report["results"]:
        assert run["failed"] == 0 and run["output_tokens"] > 0 and run["goodput"] > 0
        assert run["ttft"]["p50_ms"] > 0 and run["e2el"]["p99_ms"] >= run["e2el"]["p50_ms"]
    assert "TTFT" in result.stdout and "goodput" in result.stdout


def test_the_command_line_starts_without_torch():
    """The `pagoda` command parses its flags without importing torch or transformers, so that `serve`
    can spawn its engine core process first (that process imports them meanwhile)."""
    code = ("import sys; from pagoda.engine.entrypoints import cli; cli.build_parser().parse_args(['serve']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flags,driver,expected", [
    (["--engine-core-process"], False, True), (["--no-engine-core-process"], True, False),
    ([], True, True), ([], False, False), (["--device", "cpu"], True, False)])
def test_serve_guesses_whether_to_prestart_the_core(monkeypatch, flags, driver, expected):
    monkeypatch.setattr(cli.os.path, "exists", lambda path: driver and path == "/dev/nvidiactl")
    args = cli.build_parser().parse_args(["serve", "--standalone", *flags])
    assert cli._core_gets_a_process(args) is expected
