"""The arguments of pagoda's Ray Serve app: what `pagoda.cluster.app:build_app(args)` accepts.

This is the contract between everything that *writes* app arguments and the app builder that
*reads* them:

    deploy/serve.yaml ─┐
    helm serveConfigV2 ─┼─ args: dict ──> parse_app_args(args) ──> AppConfig ──> build_app
    serve run k=v ...  ─┤                   (this file)                         (cluster/app.py)
    pagoda serve CLI  ─┘

Two spellings are accepted (see `parse_app_args`):

    # list form: one entry per served model
    args: {models: [{model: default, tensor_parallel_size: 2, min_replicas: 1, max_replicas: 4}]}

    # single-model shorthand, as `serve run pagoda.cluster.app:build_app model=default
    # tensor_parallel_size=2` passes it: flat, and every value may be a string
    args: {model: default, tensor_parallel_size: "2"}

Replica arithmetic (what a cluster must provide):

    one replica  = tensor_parallel_size workers × (num_gpus_per_worker GPUs + num_cpus_per_worker CPUs)
    one model    = num_replicas (fixed) or min_replicas..max_replicas (autoscaled) replicas
    the app      = its models' replicas + ingress_replicas × 1 CPU (the HTTP ingress)
    the autoscaler adds a replica when a replica holds more than target_ongoing_requests
    requests (waiting + running) for upscale_delay_s, and removes one after downscale_delay_s

This module imports no Ray so that tests, the Helm chart's tests and the CLI can validate
arguments without starting (or installing) a cluster.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pagoda.engine.entrypoints.settings import CHAT_SETTINGS, ServerSettings

# num_cpus_per_worker when a worker has a GPU (it feeds the GPU) and when it has none. NOTE: half a
# core on CPU lets two replicas and the ingress (1 CPU) fit a 2-core machine; the engine's step runs
# its torch threads regardless of the share Ray books for it.
GPU_WORKER_NUM_CPUS = 1.0
CPU_WORKER_NUM_CPUS = 0.5

# The name `serve run ... model=default` and the CLI use for the model that ships with the
# test extra (a small GGUF); any other value is a local path to a checkpoint directory or file.
DEFAULT_MODEL = "default"

_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Strings `serve run` users type for "no value"; only honoured in the flat shorthand.
_CLI_NULLS = frozenset({"null", "none", "~"})


class ModelDeployment(BaseModel):
    """One served model: which weights, how they are split across GPUs, and how many copies."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, min_length=1)
    """Local path to the weights, or "default" for the bundled small model."""
    served_model_name: str | None = Field(None, min_length=1)
    """The name clients put in `"model": ...`; defaults to `model`."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs (Ray workers) one replica's weights are sharded over; all on one node."""
    distributed_executor_backend: Literal["uni", "mp", "ray"] | None = None
    """Where a replica's model runs. tensor_parallel_size > 1: "ray" (worker actors in the replica's
    placement group; the only choice). One GPU: "uni" (the default: in the replica's engine core,
    which on GPU is a process of its own, `engine_core_process`) or "mp" (in one more worker process
    under it)."""

    num_replicas: int | None = Field(None, ge=1)
    """A fixed replica count; when set, autoscaling is off and min/max_replicas must be unset."""
    min_replicas: int = Field(1, ge=0)
    """Autoscaling floor; 0 lets an idle model release its GPUs (first request then waits)."""
    max_replicas: int = Field(1, ge=1)
    """Autoscaling ceiling; the cluster must be able to grow to max_replicas × GPUs per replica."""
    target_ongoing_requests: float = Field(32.0, gt=0)
    """Waiting + running requests per replica that the autoscaler steers towards. NOTE: much
    higher than Ray Serve's default of 2, because one engine batches tens of sequences."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """How long load must stay above target before a replica is added."""
    downscale_delay_s: float = Field(600.0, ge=0)
    """How long load must stay below target before a replica is removed (GPU startup is slow,
    so scale down reluctantly)."""
    max_ongoing_requests: int = Field(256, ge=1)
    """Requests Serve hands one replica at once; the engine queues what it cannot batch. NOTE:
    Ray Serve's default of 5 would starve continuous batching."""
    max_queued_requests: int | None = Field(None, ge=1)
    """Requests allowed to wait in the Serve router for a free replica before clients get 503;
    None = unbounded. NOTE: Serve counts a request as waiting while it is being routed, even to an
    idle replica, so a burst of N simultaneous requests can meet 503s below N: keep it well above
    the bursts you expect."""

    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Further engine options passed through unchanged, e.g. max_model_len, max_num_seqs, dtype,
    gpu_memory_utilization, block_size, enable_prefix_caching, kv_cache_memory_bytes,
    scheduling_policy ("fcfs" or "priority": whether a request's `priority` orders the queue)."""
    num_gpus_per_worker: float = Field(1.0, ge=0)
    """GPUs reserved per tensor-parallel worker: 1 on GPU clusters, 0 to run on CPU."""
    num_cpus_per_worker: float = Field(GPU_WORKER_NUM_CPUS, ge=0)
    """CPUs reserved per tensor-parallel worker (tokenisation and scheduling run on it). Unset, it is
    GPU_WORKER_NUM_CPUS (1) when the worker has a GPU and CPU_WORKER_NUM_CPUS (0.5) when
    num_gpus_per_worker is 0."""

    @field_validator("engine_args")
    @classmethod
    def _engine_args_do_not_shadow_fields(cls, engine_args: dict[str, Any]) -> dict[str, Any]:
        # One name per concept: tensor_parallel_size in engine_args as well as at the model level
        # would leave two answers to "how many GPUs does a replica use".
        shadowed = sorted(set(engine_args) & set(cls.model_fields))
        if shadowed:
            raise ValueError(
                f"engine_args must not repeat model-level options {shadowed}; "
                "set them next to `model` instead"
            )
        return engine_args

    @model_validator(mode="after")
    def _default_cpus_follow_gpus(self) -> ModelDeployment:
        if "num_cpus_per_worker" not in self.model_fields_set and self.num_gpus_per_worker == 0:
            self.num_cpus_per_worker = CPU_WORKER_NUM_CPUS
        return self

    @model_validator(mode="after")
    def _check_replica_bounds(self) -> ModelDeployment:
        if self.num_replicas is not None:
            both = sorted({"min_replicas", "max_replicas"} & self.model_fields_set)
            if both:
                raise ValueError(
                    f"num_replicas={self.num_replicas} (a fixed count) cannot be combined with "
                    f"{', '.join(f'{name}={getattr(self, name)}' for name in both)} "
                    "(autoscaling bounds); set one or the other"
                )
        elif self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} is greater than max_replicas={self.max_replicas}"
            )
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"target_ongoing_requests={self.target_ongoing_requests} exceeds "
                f"max_ongoing_requests={self.max_ongoing_requests}: a replica could never reach "
                "the autoscaling target"
            )
        return self

    @model_validator(mode="after")
    def _check_executor_backend(self) -> ModelDeployment:
        backend, tp = self.distributed_executor_backend, self.tensor_parallel_size
        if tp > 1 and backend not in (None, "ray"):
            raise ValueError(f"distributed_executor_backend={backend!r} with tensor_parallel_size={tp}: a "
                             "tensor-parallel replica runs its workers as Ray actors in its placement group; "
                             "use 'ray' (or leave it unset)")
        if tp == 1 and backend == "ray":
            raise ValueError("distributed_executor_backend='ray' with tensor_parallel_size=1: a one-GPU replica "
                             "runs its model itself ('uni') or in a worker process ('mp')")
        return self

    @property
    def executor_backend(self) -> str:
        """The backend a replica uses (the default resolved)."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "ray" if self.tensor_parallel_size > 1 else "uni"

    @property
    def name(self) -> str:
        """The model name clients request and metrics carry as `model_name`."""
        return self.served_model_name or self.model

    @property
    def autoscaling(self) -> bool:
        return self.num_replicas is None

    @property
    def num_gpus_per_replica(self) -> float:
        return self.tensor_parallel_size * self.num_gpus_per_worker

    @property
    def initial_replicas(self) -> int:
        """Replicas that must be placed for the model to serve at all: the fixed count, else the
        autoscaling floor but at least one (a floor of 0 still needs one replica for a request)."""
        return self.num_replicas if self.num_replicas is not None else max(self.min_replicas, 1)

    @property
    def most_replicas(self) -> int:
        """The replicas it may run at most: the fixed count, else the autoscaling ceiling."""
        return self.num_replicas if self.num_replicas is not None else self.max_replicas


class AppConfig(BaseModel):
    """Everything `build_app` needs: the models, plus options of the HTTP ingress."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelDeployment] = Field(min_length=1)
    api_key_env: str | None = None
    """Name of an environment variable that holds the API key (e.g. filled from a Kubernetes
    Secret); None = no authentication. The key itself never appears in the args, which are
    visible in the Serve config and the Ray dashboard."""
    max_request_body_bytes: int = Field(16 * 1024 * 1024, ge=1)
    """Larger request bodies get 413 before they are parsed."""
    ingress_replicas: int = Field(1, ge=1)
    """HTTP ingress replicas (Serve's proxy spreads requests over them). Each formats the events of
    the streams it holds, some 10-15k events/s per CPU core: add one per ~10k streamed tokens/s."""
    route_prefix: str = "/"
    """Where the OpenAI API is mounted; must equal the Serve application's route_prefix."""
    console: bool = True
    """The web console's page at `/` (`pagoda serve --disable-console` sets False); the status
    endpoint `GET /v1/cluster/status` is served either way."""
    chat: dict[str, Any] = Field(default_factory=dict)
    """How the ingress renders and reads chat requests: the chat fields of `ServerSettings`
    (chat_template, trust_request_chat_template, enable_auto_tool_choice, tool_call_parser,
    reasoning_parser), as `pagoda serve`'s flags of the same names set them."""

    @field_validator("chat")
    @classmethod
    def _chat_settings(cls, chat: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(chat) - set(CHAT_SETTINGS))
        if unknown:
            raise ValueError(f"chat has unknown settings {unknown}; known: {list(CHAT_SETTINGS)}")
        ServerSettings(**chat)              # the same checks as the standalone server's (parser names, template)
        return chat

    @field_validator("api_key_env")
    @classmethod
    def _is_env_var_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_VAR_NAME.match(name):
            raise ValueError(
                f"api_key_env={name!r} is not an environment variable name "
                "(letters, digits, underscores; the key itself belongs in that variable)"
            )
        return name

    @field_validator("route_prefix")
    @classmethod
    def _starts_with_slash(cls, prefix: str) -> str:
        if not prefix.startswith("/"):
            raise ValueError(f"route_prefix={prefix!r} must start with '/'")
        return prefix

    @model_validator(mode="after")
    def _served_names_unique(self) -> AppConfig:
        names = [deployment.name for deployment in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"served model names must be unique, but {duplicates} appear more than once; "
                "set served_model_name to tell them apart"
            )
        return self


APP_KEYS = frozenset(AppConfig.model_fields) - {"models"}
MODEL_KEYS = frozenset(ModelDeployment.model_fields)
_ENGINE_ARG_PREFIX = "engine_args."


def parse_app_args(args: Mapping[str, Any] | None) -> AppConfig:
    """Validate the `args` of the Serve application and return the typed config.

    Accepts the list form `{"models": [{...}, ...], <app options>}` and the single-model
    shorthand `{<model options>, <app options>}`. In the shorthand, values may be strings as
    `serve run` passes them ("2" → 2, "true" → True, "null" → None), `engine_args` may be a
    JSON object string, and `engine_args.<name>=<value>` sets one engine option.
    Raises ValueError naming the offending key(s) or value(s).
    """
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ValueError(f"app args must be a mapping, got {type(args).__name__}: {args!r}")
    non_str = [key for key in args if not isinstance(key, str)]
    if non_str:
        raise ValueError(f"app args keys must be strings, got {non_str!r}")

    if "models" in args:
        data = _list_form(args)
    else:
        data = _shorthand_form(args)
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None


def _list_form(args: Mapping[str, Any]) -> dict[str, Any]:
    misplaced = sorted((set(args) - {"models"}) & (MODEL_KEYS | _engine_arg_keys(args)))
    if misplaced:
        raise ValueError(
            f"model option(s) {misplaced} given at the top level next to 'models'; "
            "put them inside each entry of 'models'"
        )
    _reject_unknown(set(args) - APP_KEYS - {"models"}, accepted=APP_KEYS | {"models"})
    models = args["models"]
    if isinstance(models, str):  # `serve run ... models='[{"model": "default"}, ...]'`
        try:
            models = json.loads(models)
        except json.JSONDecodeError as exc:
            raise ValueError(f"models={models!r} is not a JSON list ({exc.msg})") from None
    if isinstance(models, list):
        for index, entry in enumerate(models):
            if isinstance(entry, Mapping):
                _reject_unknown(set(entry) - MODEL_KEYS, accepted=MODEL_KEYS,
                                where=f"key(s) in models[{index}]:")
    return {**args, "models": models}


def _shorthand_form(args: Mapping[str, Any]) -> dict[str, Any]:
    engine_arg_keys = _engine_arg_keys(args)
    _reject_unknown(set(args) - APP_KEYS - MODEL_KEYS - engine_arg_keys,
                    accepted=APP_KEYS | MODEL_KEYS | {"models", _ENGINE_ARG_PREFIX + "<name>"})
    app = {key: _cli_null(value) for key, value in args.items() if key in APP_KEYS}
    model = {key: _cli_null(value) for key, value in args.items() if key in MODEL_KEYS}

    engine_args = model.get("engine_args")
    if isinstance(engine_args, str):
        try:
            engine_args = json.loads(engine_args)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"engine_args={engine_args!r} is not a JSON object ({exc.msg}); "
                'write e.g. engine_args=\'{"max_model_len": 4096}\' or engine_args.max_model_len=4096'
            ) from None
    if engine_arg_keys:
        engine_args = dict(engine_args or {})
        for key in sorted(engine_arg_keys):
            engine_args[key.removeprefix(_ENGINE_ARG_PREFIX)] = _cli_scalar(args[key])
    if engine_args is not None:
        model["engine_args"] = engine_args
    return {**app, "models": [model]}


def _engine_arg_keys(args: Mapping[str, Any]) -> set[str]:
    return {key for key in args
            if key.startswith(_ENGINE_ARG_PREFIX) and len(key) > len(_ENGINE_ARG_PREFIX)}


def _reject_unknown(unknown: set[str], accepted: frozenset[str] | set[str],
                    where: str = "app argument(s)") -> None:
    if unknown:
        raise ValueError(
            f"unknown {where} {sorted(unknown)}; accepted: {', '.join(sorted(accepted))}"
        )


def _cli_null(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in _CLI_NULLS:
        return None
    return value


def _cli_scalar(value: Any) -> Any:
    """Best-effort typing of one `engine_args.<name>=<value>` string: JSON literal, else str."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() in _CLI_NULLS:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        location = _format_location(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in ("value_error", "assertion_error") or "input" not in error:
            lines.append(f"{location}: {message}" if location else message)
        else:
            lines.append(f"{location}: {message} (got {error['input']!r})")
    return "invalid pagoda app args: " + "; ".join(lines)


def _format_location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1] = f"{parts[-1]}[{part}]" if parts else f"[{part}]"
        else:
            parts.append(part)
    return ".".join(parts)
