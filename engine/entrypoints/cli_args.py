"""Command-line flags -> typed objects: the engine flags every `pagoda` command shares, and the
server flags of `pagoda serve` (`add_chat_flags`: chat template, tool calling, reasoning), turned
into `EngineArgs` and `ServerSettings`.

Apart from cli.py so that the Ray path (pagoda.cluster.cli), which the engine's CLI hands `serve`
to, reads the same flags without importing the CLI that imports it.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from typing import TYPE_CHECKING

from .settings import ServerSettings

if TYPE_CHECKING:
    from ..config import EngineArgs

_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_bytes(text: str) -> int:
    """'16777216', '16MiB', '16M', '1.5GiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]i?)?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 16777216 or 16MiB, got {text!r}")
    number, unit = match.groups()
    value = int(float(number) * _SIZE_UNITS[(unit or "").lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def parse_origins(text: str) -> list[str]:
    """A JSON list ('["https://a.example"]', as vLLM takes it) or comma-separated origins."""
    text = text.strip()
    if text.startswith("["):
        try:
            origins = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"--allowed-origins is not a JSON list: {error}") from None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise argparse.ArgumentTypeError(f"--allowed-origins must be a list of strings, got {text!r}")
        return origins
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def read_chat_template(value: str) -> str:
    """--chat-template: the file it names, else (when it looks like Jinja) the template text itself, as vLLM."""
    if _is_file(value):
        try:
            return Path(value).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise argparse.ArgumentTypeError(f"--chat-template: cannot read {value!r}: {error}") from None
    if not any(char in value for char in "{}\n"):
        raise argparse.ArgumentTypeError(f"--chat-template {value!r} looks like a file path, but no such file exists")
    return value


def _is_file(value: str) -> bool:
    try:
        return Path(value).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):     # too long, a NUL byte, no home: template text
        return False


def add_chat_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagoda serve` that shape chat requests (vLLM's names), and --disable-console."""
    group = parser.add_argument_group("chat")
    group.add_argument("--chat-template", type=read_chat_template, default=None,
                       help="a Jinja chat template, or the file holding one, used instead of the tokenizer's")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests bring their own chat_template (code the server runs; off by default)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="tool_choice 'auto': parse tool calls out of the model's output")
    group.add_argument("--tool-call-parser", default=None, metavar="NAME",
                       help="how the model writes tool calls: hermes, llama3_json, mistral (default: from the "
                            "chat template)")
    group.add_argument("--reasoning-parser", default=None, metavar="NAME",
                       help="split reasoning_content from content: qwen3, deepseek_r1 (default: none)")
    # NOTE: here, as `pagoda serve` (standalone and Ray) adds these flags: the console is a server setting too
    console = parser.add_argument_group("console")
    console.add_argument("--disable-console", action="store_true",
                         help="do not serve the web console at / (GET /v1/cluster/status stays)")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per sequence")
    group.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step")
    group.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                       help="'fcfs': requests in arrival order (their priority ignored); 'priority': lower "
                            "priority values first, and preemption takes the lowest priority first")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    group.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "ray"],
                       help="where the model runs: 'uni' in the serving process, 'mp' in worker processes "
                            "(one per GPU), 'ray' in Ray actors (cluster only). Default: uni for one GPU, "
                            "mp for several; in a cluster replica, see ModelDeployment")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None,
                       help="KV-cache budget, e.g. 16MiB (default: from gpu-memory-utilization; 1 GiB on CPU)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--served-model-name", default=None, help="the name clients use (default: MODEL)")
    group.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    group.add_argument("--revision", default=None,
                       help="a Hub id's branch, tag or commit in the local Hugging Face cache (default: main)")
    group.add_argument("--download-dir", default=None, metavar="DIR",
                       help="a Hugging Face cache folder searched for a Hub id before HF_HUB_CACHE / HF_HOME "
                            "(nothing is downloaded)")
    group.add_argument("--generation-config", default="auto", metavar="auto|vllm|PATH",
                       help="sampling defaults for requests that leave them unset: 'auto' = the model's "
                            "generation_config.json, 'vllm' = pagoda's own, PATH = a folder holding a "
                            "generation_config.json")
    group.add_argument("--quantization", "-q", default=None,
                       choices=["fp8", "compressed-tensors", "gptq", "awq", "gguf", "mxfp4"],
                       help="weight quantization: 'fp8' quantizes a bf16/fp16 checkpoint at load (FP8 W8A8); "
                            "a quantized checkpoint (config.json quantization_config, or a GGUF file) is "
                            "detected without it. 'gguf' keeps a GGUF file's blocks quantized on CPU too")
    group.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                       help="KV-cache element type: 'auto' = the model dtype; 'fp8' (e4m3) halves the cache's "
                            "bytes per token, with per-layer scales from the checkpoint or 1.0")
    group.add_argument("--calculate-kv-scales", action="store_true",
                       help="with --kv-cache-dtype fp8: calibrate each layer's K and V scales on the first "
                            "prompts instead of using the checkpoint's (or 1.0)")
    group.add_argument("--speculative-config", default=None, metavar="JSON",
                       help='speculative decoding, as vLLM: e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                            '"prompt_lookup_max": 4}\' (also prompt_lookup_min, disable_by_batch_size); default: off')
    group.add_argument("--enable-expert-parallel", action="store_true",
                       help="mixture-of-experts models: each tensor-parallel rank holds num_experts / tp whole "
                            "experts instead of a 1/tp slice of every expert")
    group.add_argument("--enforce-eager", action="store_true")
    group.add_argument("--engine-core-process", action=argparse.BooleanOptionalAction, default=None,
                       help="run the engine core (scheduler + model) in a process of its own, apart from "
                            "the HTTP server (default: on with CUDA)")


def engine_args_from(args: argparse.Namespace) -> "EngineArgs":
    from ..config import EngineArgs        # NOTE: torch and transformers: only once a command runs

    return EngineArgs(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        scheduling_policy=args.scheduling_policy,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_expert_parallel=bool(getattr(args, "enable_expert_parallel", False)),
        distributed_executor_backend=getattr(args, "distributed_executor_backend", None),
        engine_core_process=getattr(args, "engine_core_process", None),
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, seed=args.seed,
        served_model_name=args.served_model_name, load_format=args.load_format, enforce_eager=args.enforce_eager,
        quantization=getattr(args, "quantization", None), kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        calculate_kv_scales=bool(getattr(args, "calculate_kv_scales", False)),
        speculative_config=getattr(args, "speculative_config", None),
        revision=getattr(args, "revision", None), download_dir=getattr(args, "download_dir", None),
        generation_config=getattr(args, "generation_config", "auto"))


def server_settings_from(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key or None, allowed_origins=args.allowed_origins,
        max_request_body_bytes=args.max_request_body_bytes, shutdown_timeout_s=args.shutdown_timeout,
        grpc_port=args.grpc_port, log_level=args.uvicorn_log_level,
        # NOTE: getattr: a parser without add_chat_flags (the cluster's, an older one) serves the defaults
        chat_template=_optional(args, "chat_template"),
        trust_request_chat_template=bool(getattr(args, "trust_request_chat_template", False)),
        enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
        tool_call_parser=_optional(args, "tool_call_parser"), reasoning_parser=_optional(args, "reasoning_parser"),
        disable_console=bool(getattr(args, "disable_console", False)))


def _optional(args: argparse.Namespace, name: str) -> Optional[str]:
    return getattr(args, name, None)
