"""pagoda.engine: paged KV cache, continuous batching, the offline API and the servers.

Never imports Ray or FastAPI at module level: the engine runs alone and under Ray.
"""

if __name__ != "pagoda.engine":
    # NOTE: reached only when the repository root is on sys.path and something imports the folder by
    # its bare name; loading it as a second copy of pagoda.engine would only fail later and obscurely.
    raise ImportError(f"{__name__!r} is not a package: this folder installs as pagoda.engine "
                      "(pip install -e . in the repository root)")

import importlib
from typing import Any

# NOTE: loaded on first use (PEP 562): `import pagoda.engine` (and so the `pagoda` command's first
# import) stays free of torch and transformers, which lets `pagoda serve` start its engine core
# process before this process spends seconds importing them.
_EXPORTS = {"LLM": ".llm", "EngineArgs": ".config", "SamplingParams": ".sampling_params",
            "StructuredOutputsParams": ".structured_output.params", "RequestOutput": ".outputs",
            "CompletionOutput": ".outputs", "Logprob": ".outputs"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineArgs", "RequestOutput", "CompletionOutput", "Logprob"]
