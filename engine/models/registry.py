"""Maps Hugging Face architecture names (config.json `architectures`) to model classes."""
from __future__ import annotations

import torch.nn as nn

from .gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from .gpt_oss import GptOssForCausalLM
from .llama import LlamaForCausalLM, MistralForCausalLM, check_tensor_parallel
from .mixtral import MixtralForCausalLM
from .phi3 import Phi3ForCausalLM
from .qwen import Qwen2ForCausalLM, Qwen3ForCausalLM
from .qwen2_moe import Qwen2MoeForCausalLM
from .qwen3_moe import MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
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


def is_moe_model(model_class: type[nn.Module]) -> bool:
    """Whether `model_class` is a mixture-of-experts family: it takes the keyword `moe_options`
    (layers/moe.py `MoeOptions`), which the dense families do not."""
    return issubclass(model_class, MoeForCausalLM)


def check_parallel(architecture: str, hf_config: object, tp_size: int, enable_expert_parallel: bool) -> None:
    """Raises ValueError naming the value when the model cannot split over `tp_size` ranks: attention
    heads and MLPs for every family, and the experts' split (or placement, `enable_expert_parallel`)
    for a mixture-of-experts one; expert parallelism asked of a dense model is an error too."""
    model_class = get_model_class(architecture)
    if is_moe_model(model_class):
        model_class.check_parallel(hf_config, tp_size, enable_expert_parallel)
    elif enable_expert_parallel:
        raise ValueError(f"enable_expert_parallel=True needs a mixture-of-experts model; {architecture} "
                         "has no experts")
    else:
        check_tensor_parallel(hf_config, tp_size)
