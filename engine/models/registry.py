"""Maps Hugging Face architecture names (config.json `architectures`) to model classes."""
from __future__ import annotations

import torch.nn as nn

from .llama import LlamaForCausalLM, MistralForCausalLM
from .qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def check_architecture(architecture: str) -> None:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        )


def get_model_class(architecture: str) -> type[nn.Module]:
    check_architecture(architecture)
    return MODEL_REGISTRY[architecture]
