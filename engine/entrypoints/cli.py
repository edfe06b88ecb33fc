"""The `pagoda` command.

    pagoda generate --model default --prompt "Once upon a time" [--max-tokens 64 --temperature 0 --seed 1]
    pagoda serve [MODEL] [--standalone] [--host 127.0.0.1 --port 8000 --api-key KEY --grpc-port 50051 ...]

Flags are named as vLLM's where the meaning is the same. `serve --standalone` runs the HTTP (and
optional gRPC) server in this process. Without `--standalone`, `serve` hands over to the cluster
CLI (`pagoda.cluster.cli.serve(args)`, Ray Serve), which also owns `pagoda status`.

Ray is an optional extra (`pip install 'pagoda[cluster]'`). Without it (or with Ray but without
Ray Serve) the Ray commands exit with status 1 and one message, the same for both, that names the
install and `--standalone`; never a traceback, and never a silent fall-back to one process. This
module imports no Ray: the cluster CLI imports it when a Ray command runs.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional

from .auth import API_KEY_ENV
from .cli_args import (add_chat_flags, add_engine_flags, engine_args_from, parse_bytes, parse_origins,
                       server_settings_from)

logger = logging.getLogger("pagoda.cli")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: LLM inference and serving")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete one prompt and print the text")
    generate.add_argument("--model", default="default", help="'default', a checkpoint directory or a .gguf file")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    add_engine_flags(generate)
    generate.set_defaults(handler=run_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API (and gRPC)")
    serve.add_argument("model_positional", nargs="?", metavar="MODEL", default=None,
                       help="'default', a checkpoint directory or a .gguf file")
    serve.add_argument("--model", default=None, help="same as MODEL")
    serve.add_argument("--standalone", action="store_true", help="one process, no Ray")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC on this port")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on inference routes (default: ${API_KEY_ENV})")
    serve.add_argument("--allowed-origins", type=parse_origins, default=[],
                       help="CORS origins, JSON list or comma-separated (default: CORS off)")
    serve.add_argument("--max-request-body-bytes", type=parse_bytes, default=16 * 2**20)
    serve.add_argument("--max-queued-requests", type=int, default=None,
                       help="answer 503 while this many requests wait (default: unbounded)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds SIGTERM lets in-flight requests finish before aborting them")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_chat_flags(serve)
    add_engine_flags(serve)
    serve.set_defaults(handler=run_serve)
    cluster_cli = _cluster_cli_module()
    if cluster_cli is not None:   # pagoda.cluster adds the Ray flags to `serve` and the `status` command
        cluster_cli.add_serve_flags(serve)
        cluster_cli.add_status_command(commands)
    return parser


def _cluster_cli_module():
    """pagoda.cluster.cli (imports no Ray at module level), or None when it is not installed."""
    try:
        return importlib.import_module("pagoda.cluster.cli")
    except ModuleNotFoundError as error:
        if error.name == "pagoda.cluster.cli":
            return None
        raise


def run_generate(args: argparse.Namespace) -> int:
    import dataclasses

    from ..llm import LLM
    from ..sampling_params import SamplingParams

    engine_args = engine_args_from(args)
    llm = LLM(**{f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    try:
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            outputs = llm.generate(args.prompt, params, use_tqdm=False)
    finally:
        llm.shutdown()
    print(outputs[0].outputs[0].text)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    if args.model_positional and args.model and args.model_positional != args.model:
        raise ValueError(f"MODEL {args.model_positional!r} and --model {args.model!r} disagree; pass one")
    args.model = args.model_positional or args.model or "default"
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.standalone:
        return serve_standalone(args)
    return cluster_entrypoint()(args)


def cluster_entrypoint() -> Callable[[argparse.Namespace], int]:
    """`pagoda.cluster.cli.serve(args) -> exit code`: `pagoda serve` without --standalone.

    It gets the parsed `serve` flags (`engine_args_from(args)` and `server_settings_from(args)` build
    the engine and server settings) and imports Ray itself, so a missing Ray raises from the call.
    """
    return importlib.import_module("pagoda.cluster.cli").serve


RAY_MISSING_MESSAGE = ("`pagoda serve` without --standalone and `pagoda status` run on Ray Serve, which is not "
                       "installed ({cause}). Install it with: pip install 'pagoda[cluster]'. "
                       "Or serve in one process without Ray: pagoda serve MODEL --standalone")
_CLUSTER_MODULES = ("pagoda.cluster", "pagoda.cluster.cli")


def is_ray_missing(error: ImportError) -> bool:
    """True when `error` means the cluster extra is not (fully) installed: the missing module is `ray`,
    one of its submodules or pagoda's cluster CLI, or the failing import statement is in Ray's own
    code (Ray installed without its `serve` extra fails on a dependency of `ray.serve`)."""
    name = error.name or ""
    if name == "ray" or name.startswith("ray.") or name in _CLUSTER_MODULES:
        return True
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    module = innermost.tb_frame.f_globals.get("__name__", "") if innermost is not None else ""
    return module == "ray" or module.startswith("ray.")


def _runs_on_ray(args: argparse.Namespace) -> bool:
    return args.command == "status" or (args.command == "serve" and not args.standalone)


def _core_gets_a_process(args: argparse.Namespace) -> bool:
    """Whether the engine core will run in a process of its own, guessed before torch is imported:
    asked for, or left to the default (on with CUDA) on a host with an NVIDIA driver. A wrong guess
    costs a process that is stopped once the config says otherwise."""
    if args.engine_core_process is not None:
        return args.engine_core_process
    return args.device != "cpu" and os.path.exists("/dev/nvidiactl")


def serve_standalone(args: argparse.Namespace) -> int:
    from ..core.core_prestart import PrestartedCore

    # NOTE: first, before this process imports torch and transformers: the core imports them too,
    # meanwhile (most of a cold start is imports)
    prestarted = PrestartedCore() if _core_gets_a_process(args) else None
    try:
        return _serve_standalone(args, prestarted)
    finally:
        if prestarted is not None:
            prestarted.close()                 # (nothing to do once the engine took it)


def _serve_standalone(args: argparse.Namespace, prestarted: Optional[Any]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from ..async_engine import AsyncEngine
    from ..utils import startup_timeline

    startup_timeline.mark("imports")
    settings = server_settings_from(args)
    engine_args = engine_args_from(args)
    if prestarted is not None:
        prestarted.send_args(engine_args)      # the core builds its config as this process builds its own
    config = engine_args.create_config()
    startup_timeline.mark("config")
    # NOTE: the HTTP server's modules (FastAPI, uvicorn, the OpenAI protocol) load while the engine
    # core starts, which leaves this process waiting (or, with the core on a thread, mostly in torch)
    with ThreadPoolExecutor(1, thread_name_prefix="pagoda-http-import") as pool:
        http_modules = pool.submit(startup_timeline.span("HTTP imports")(importlib.import_module),
                                   "pagoda.engine.entrypoints.openai.api_server")
        engine = AsyncEngine(config, max_queued_requests=args.max_queued_requests, prestarted_core=prestarted)
    startup_timeline.mark("engine core")
    try:
        run_server = http_modules.result().run_server
    except BaseException:
        engine.shutdown()
        raise
    logger.info("serving model %r on http://%s:%d (max_model_len %d)", engine.model_names[0], settings.host,
                settings.port, engine.max_model_len)
    try:
        asyncio.run(run_server(engine, settings))
    finally:
        engine.shutdown()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command == "serve" else logging.WARNING,
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"pagoda: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        # NOTE: the cluster CLI imports Ray only inside `serve` and `status`, so a missing Ray surfaces
        # here, for both commands alike; any other import error keeps its traceback.
        if not (_runs_on_ray(args) and is_ray_missing(error)):
            raise
        print(f"pagoda: error: {RAY_MISSING_MESSAGE.format(cause=error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
