"""Tiny random checkpoints for fast, offline tests: Hugging Face directories and a llama GGUF.

`save_tiny_model(directory, TinyModelSpec(...))` writes a real `save_pretrained` checkpoint (config.json,
generation_config.json, safetensors, optionally sharded, and a tokenizer) of a ~0.5M-parameter
llama / mistral / qwen2 / qwen3 model with random float32 weights, so tests can load it with pagoda and
with transformers and compare. `write_tiny_gguf` converts such a checkpoint to GGUF the way
llama.cpp's `convert_hf_to_gguf.py` does (its tensor names, its q/k row permutation for llama, the
tokenizer in the metadata), to test the GGUF path without the 100 MB default model. Nothing is downloaded: the
tokenizer is a byte-level BPE trained here on a few sentences.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# ChatML, as SmolLM2 / Qwen use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Special tokens first, so their ids are fixed: 0 pad/endoftext, 1 bos, 2 eos (SmolLM2's layout).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2

_TOKENIZER_CORPUS = [
    "Once upon a time there was a tiny model that lived in a test suite.",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Hello world! How are you today? I am fine, thank you.",
    "Tensor parallelism splits each weight matrix across ranks.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ! ?",
]


@dataclass(frozen=True)
class TinyModelSpec:
    """What to build. Defaults: llama, GQA (2 query heads, 1 KV head), head_dim 64, untied, one file.

    head_dim: 64 (= hidden_size / num_attention_heads) or e.g. 128 (q_proj wider than hidden_size, as
        in Qwen3 / Gemma), to catch code that assumes head_dim == hidden_size // num_heads.
    rope_scaling: llama3-style rope scaling (llama only).
    max_shard_size: passed to `save_pretrained` (e.g. "200KB") to write several shards + an index.
    """

    family: str = "llama"
    tie_word_embeddings: bool = False
    head_dim: int = 64
    rope_scaling: bool = False
    max_shard_size: str | None = None
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    vocab_size: int = 512
    seed: int = 0
    extra_config: tuple[tuple[str, object], ...] = field(default=())

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.rope_scaling and self.family != "llama":
            raise ValueError(f"rope_scaling is llama3-style and only offered for llama, not {self.family!r}")

    @property
    def slug(self) -> str:
        """A short directory name for this spec."""
        parts = [self.family, f"hd{self.head_dim}", "tied" if self.tie_word_embeddings else "untied"]
        if self.rope_scaling:
            parts.append("rope3")
        if self.max_shard_size:
            parts.append("sharded")
        return "-".join(parts)


def make_tiny_config(spec: TinyModelSpec) -> transformers.PretrainedConfig:
    """The transformers config for `spec` (float32)."""
    rope_parameters: dict = {"rope_type": "default", "rope_theta": 10000.0}
    if spec.rope_scaling:
        rope_parameters = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    config_class = transformers.CONFIG_MAPPING[spec.family]
    return config_class(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters=rope_parameters,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        dtype="float32",
        **dict(spec.extra_config),
    )


def build_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (a few hundred tokens) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[BOS_TOKEN_ID],
        eos_token=SPECIAL_TOKENS[EOS_TOKEN_ID],
        pad_token=SPECIAL_TOKENS[PAD_TOKEN_ID],
        unk_token=SPECIAL_TOKENS[PAD_TOKEN_ID],
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def save_tiny_model(directory: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a random tiny checkpoint of `spec` plus its tokenizer into `directory`; returns `directory`."""
    directory = Path(directory)
    config = make_tiny_config(spec)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, spec.seed)
    save_kwargs = {} if spec.max_shard_size is None else {"max_shard_size": spec.max_shard_size}
    model.save_pretrained(directory, **save_kwargs)
    tokenizer = build_tiny_tokenizer()
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={spec.vocab_size}")
    tokenizer.save_pretrained(directory)
    return directory


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `directory` (what the checkpoint holds, not the model)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


# HF model_type -> llama.cpp architecture; llama.cpp converts Mistral checkpoints as "llama".
GGUF_ARCHITECTURE_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def write_tiny_gguf(hf_dir: Path, gguf_path: Path, tensor_type: str = "F32") -> Path:
    """Convert a tiny checkpoint in `hf_dir` to GGUF at `gguf_path`, as `convert_hf_to_gguf.py` would.

    tensor_type: "F32", "F16" or a block type gguf can quantize ("Q8_0", "Q4_1", ...) for the 2-D
        weights; norms and biases stay F32 as llama.cpp keeps them.
    Mirrors the converter: llama.cpp tensor names (`blk.N.attn_q.weight`), q/k rows permuted per head
    (`LlamaModel.permute`) for the llama architecture only, no `output.weight` when embeddings are
    tied, `<arch>.attention.key_length` = head_dim, and the tokenizer in the metadata.
    """
    import gguf

    config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    if config.model_type not in GGUF_ARCHITECTURE_OF:
        raise ValueError(f"write_tiny_gguf converts {sorted(GGUF_ARCHITECTURE_OF)}, not {config.model_type!r}")
    architecture = GGUF_ARCHITECTURE_OF[config.model_type]
    qtype = gguf.GGMLQuantizationType[tensor_type]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)

    writer = gguf.GGUFWriter(str(gguf_path), architecture)
    writer.add_name(f"tiny-{config.model_type}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if architecture == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    _add_gguf_tokenizer(writer, tokenizer, config.vocab_size)

    gguf_arch = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    name_map = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    for hf_name, tensor in read_state_dict(hf_dir).items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if architecture == "llama" and hf_name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        elif architecture == "llama" and hf_name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(gguf_path)


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: interleave the two rotary halves of every head's rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_gguf_tokenizer(writer, tokenizer: transformers.PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The tokenizer as llama.cpp stores a byte-level BPE ("gpt2") one, padded to the model's vocab."""
    import gguf

    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    id_to_token = {token_id: token for token, token_id in tokenizer_json["model"]["vocab"].items()}
    special_ids = {token["id"] for token in tokenizer_json["added_tokens"]}
    tokens, token_types = [], []
    for token_id in range(vocab_size):
        if token_id in id_to_token:
            tokens.append(id_to_token[token_id])
            token_types.append(gguf.TokenType.CONTROL if token_id in special_ids else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_pad_token_id(PAD_TOKEN_ID)
    writer.add_chat_template(CHATML_TEMPLATE)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Distinct random values everywhere (init leaves norms at 1 and biases at 0, hiding mix-ups)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                parameter.copy_(0.05 * noise)
