"""pagoda.engine: paged KV cache, continuous batching, the offline API and the servers.

Never imports Ray or FastAPI at module level: the engine runs alone and under Ray.
"""
from .config import EngineArgs
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch models and transformers: load it on first use, keeping `import pagoda.engine` light
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "EngineArgs", "RequestOutput", "CompletionOutput", "Logprob"]
