"""pagoda.engine: paged KV cache, continuous batching, the offline API and the servers.

Never imports Ray or FastAPI at module level: the engine runs alone and under Ray.
"""

if __name__ != "pagoda.engine":
    # NOTE: reached only when the repository root is on sys.path and something imports the folder by
    # its bare name; loading it as a second copy of pagoda.engine would only fail later and obscurely.
    raise ImportError(f"{__name__!r} is not a package: this folder installs as pagoda.engine "
                      "(pip install -e . in the repository root)")

from .config import EngineArgs
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams
from .structured_output.params import StructuredOutputsParams


def __getattr__(name: str):
    # LLM pulls in torch models and transformers: load it on first use, keeping `import pagoda.engine` light
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineArgs", "RequestOutput", "CompletionOutput", "Logprob"]
