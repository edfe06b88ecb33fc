"""GGUF files kept quantized (engine/quantization/gguf.py): the file's blocks become GroupQuantWeights
whose dequantization equals gguf's bit for bit, per block type and per tensor-parallel slice; engines
on such files agree with the dequantized path and with transformers; the weights stay small.

Files are written here with gguf.GGUFWriter: converted from tiny random checkpoints (Q4_0, Q4_1, Q8_0,
Q5_0, Q5_1 quantized by gguf.quants.quantize), and for Q4_K / Q5_K / Q6_K, which gguf cannot quantize,
random valid blocks (random bytes with small, finite fp16 scales), gguf.quants.dequantize being the
reference.

Tolerances: the kept-quantized engine multiplies by the very float32 weights the dequantized engine
holds, so its logprobs agree to 1e-5; against transformers (another implementation on the same
dequantized weights) 2e-4, as for unquantized checkpoints (test_hf_parity.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import model_factory
import numpy as np
import pytest
import torch
import transformers
from conftest import greedy, hf_greedy_generate, token_prompts
from model_factory import TinyModelSpec

from pagoda.engine import LLM
from pagoda.engine.layers import embedding as embedding_module
from pagoda.engine.layers import linear as linear_module
from pagoda.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda.engine.model_loader.gguf_index import read_gguf_index
from pagoda.engine.model_loader.model_source import load_hf_config, resolve_model
from pagoda.engine.model_loader.weights import iterate_weights
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.quantization.base import process_weights_after_loading
from pagoda.engine.quantization.gguf import GGUFConfig
from pagoda.engine.quantization.registry import resolve_quantization
from pagoda.kernels.weight_only import dequantize

KINDS = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"]
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")               # gguf cannot quantize these: random valid blocks
# block type -> (values, bytes) per block and the byte offsets of its fp16 scale fields
LAYOUT = {"Q4_0": (32, 18, (0,)), "Q4_1": (32, 20, (0, 2)), "Q8_0": (32, 34, (0,)),
          "Q4_K": (256, 144, (0, 2)), "Q6_K": (256, 210, (208,)), "Q5_0": (32, 22, (0,)),
          "Q5_1": (32, 24, (0, 2)), "Q5_K": (256, 176, (0, 2))}
K = 512                                        # input features of the layer-level tensors: 2 K-quant blocks
LOGPROB_ATOL_SAME_WEIGHTS = 1e-5
LOGPROB_ATOL_HF = 2e-4
KV_BYTES = 16 << 20

# K-quants need input features in whole 256-blocks: 256 hidden, 4 heads of 128 (q: 512), 2 KV heads, 512
# intermediate, so that TP=2 still gives each rank whole blocks of o_proj's and down_proj's inputs.
K_SPEC = TinyModelSpec(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=128)
TIED_SPEC = TinyModelSpec(tie_word_embeddings=True, num_key_value_heads=2)
K_TIED_SPEC = TinyModelSpec(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=128, tie_word_embeddings=True)


def random_blocks(kind: str, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, bytes) of valid `kind` blocks: random bits, fp16 scales small (weights ~0.05) and finite."""
    block_size, type_size, scale_offsets = LAYOUT[kind]
    blocks = rng.integers(0, 256, size=(rows, columns // block_size, type_size), dtype=np.uint8)
    magnitude = {"Q4_0": 6e-3, "Q4_1": 6e-3, "Q8_0": 4e-4, "Q4_K": 1e-4, "Q6_K": 4e-5, "Q5_0": 3e-3,
                 "Q5_1": 3e-3, "Q5_K": 5e-5}[kind]
    for offset in scale_offsets:
        scale = rng.uniform(0.5, 1.0, size=(rows, columns // block_size, 1)) * magnitude
        if kind in ("Q4_1", "Q5_1") and offset == 2:     # the block's min: centre the values on zero
            middle = 7.5 if kind == "Q4_1" else 15.5
            scale = -middle * blocks[..., 0:2].copy().view(np.float16).astype(np.float64)
        if kind in ("Q4_K", "Q5_K") and offset == 2:     # dmin, subtracted: centre the values on zero
            scale = scale * (8 if kind == "Q4_K" else 16)
        blocks[..., offset : offset + 2] = scale.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_layer_file(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """A minimal llama GGUF (2 heads, 1 KV head) of raw blocks: {gguf name: (block type, bytes)}."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    for name, (kind, blocks) in tensors.items():
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model_file(hf_dir: Path, path: Path, type_of, seed: int = 0) -> Path:
    """`hf_dir` converted as model_factory.write_tiny_gguf does, each 2-D tensor in `type_of(gguf name)`:
    gguf's own quantizer where it has one, random valid blocks for the K-quants."""
    rng = np.random.default_rng(seed)
    add_tensor = gguf.GGUFWriter.add_tensor

    def add_typed(writer, name, tensor, *args, **kwargs):
        kind = type_of(name) if tensor.ndim == 2 else "F32"
        if kind == "F32":
            return add_tensor(writer, name, tensor, *args, **kwargs)
        if kind in K_QUANTS:
            blocks = random_blocks(kind, tensor.shape[0], tensor.shape[1], rng)
        else:
            blocks = gguf.quants.quantize(tensor, gguf.GGMLQuantizationType[kind])
        return add_tensor(writer, name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_tensor", add_typed)
        return model_factory.write_tiny_gguf(hf_dir, path, "F32")


def q4_k_m(name: str) -> str:
    """Like llama.cpp's Q4_K_M: Q6_K for v, down and the output, Q4_K elsewhere (q/k/v mix two types)."""
    return "Q6_K" if any(part in name for part in ("attn_v", "ffn_down", "output.")) else "Q4_K"


def q5_k_m(name: str) -> str:
    """Like llama.cpp's Q5_K_M: Q6_K for v, down and the output, Q5_K elsewhere."""
    return "Q6_K" if any(part in name for part in ("attn_v", "ffn_down", "output.")) else "Q5_K"


def q5_mixed(name: str) -> str:
    """Q5_0 and Q5_1 (llama.cpp's fallbacks where rows are not whole 256-blocks), the embedding Q8_0."""
    return "Q8_0" if name.startswith("token_embd") else ("Q5_1" if "ffn" in name else "Q5_0")


def q4_k_m_q8_0_embedding(name: str) -> str:
    """Q4_K_M with a Q8_0 (tied) token embedding: every kind of TP split in one file."""
    return "Q8_0" if name.startswith("token_embd") else q4_k_m(name)


def q4_1_q8_0_embedding(name: str) -> str:
    """Like the default model: Q4_1, the (tied) token embedding Q8_0."""
    return "Q8_0" if name.startswith("token_embd") else "Q4_1"


@pytest.fixture(scope="module")
def model_files(tiny_checkpoint, tmp_path_factory):
    """name -> a GGUF file of a tiny model, built once for this module."""
    directory = tmp_path_factory.mktemp("gguf-kept")
    recipes = {
        "q4_1-q8_0-tied": (TIED_SPEC, q4_1_q8_0_embedding),
        "q4_k_m": (K_SPEC, q4_k_m),
        "q4_k_m-q8_0-tied": (K_TIED_SPEC, q4_k_m_q8_0_embedding),
        "qwen2-q4_k_m": (dataclasses.replace(K_SPEC, family="qwen2", head_dim=64), q4_k_m),   # q/k/v biases
        "Q4_0": (TinyModelSpec(), lambda name: "Q4_0"),
        "Q8_0": (TinyModelSpec(), lambda name: "Q8_0"),
        "Q4_K": (K_SPEC, lambda name: "Q4_K"),
        "Q6_K": (K_SPEC, lambda name: "Q6_K"),
        "q5_k_m": (K_SPEC, q5_k_m),
        "q5_0-q5_1": (TinyModelSpec(), q5_mixed),
    }
    built = {}

    def build(name: str) -> Path:
        if name not in built:
            spec, type_of = recipes[name]
            built[name] = write_model_file(tiny_checkpoint(spec), directory / f"{name}.gguf", type_of)
        return built[name]

    return build


def set_tp(monkeypatch, rank: int, size: int) -> None:
    """Layers built after this take rank `rank` of `size` (no process group: loading only)."""
    for module in (linear_module, embedding_module):
        monkeypatch.setattr(module, "get_tp_rank", lambda: rank)
        monkeypatch.setattr(module, "get_tp_size", lambda: size)


def load_layer(layer, weights: dict, names: list[str], shard_ids: list) -> None:
    for name, shard_id in zip(names, shard_ids):
        layer.weight.weight_loader(layer.weight, weights[name], shard_id)
    process_weights_after_loading(layer)


def layer_weight(layer) -> torch.Tensor:
    """The layer's float32 (out, in) weight, dequantized from what it holds."""
    pieces = layer.quant_method.pieces
    return torch.cat([piece if isinstance(piece, torch.Tensor) else dequantize(piece) for piece in pieces])


def held_weight_bytes(model: torch.nn.Module) -> int:
    """Parameters (norms, float weights) and the converted GGUF blocks, each storage once."""
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers() if ".gguf" in name]
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


def build_model(path: Path, quantization: GGUFConfig | None) -> LlamaForCausalLM:
    source = resolve_model(str(path))
    model = LlamaForCausalLM(load_hf_config(source), 256, torch.float32, quantization)
    model.load_weights(iterate_weights(source))
    return model


# -- (a) blocks -> GroupQuantWeight, bit for bit ----------------------------------------------------
@pytest.fixture(scope="module")
def layer_files(tmp_path_factory):
    """kind -> (file, {gguf name: raw blocks}): an 8 x 512 up, down and a permuted q of that type."""
    rng = np.random.default_rng(1)
    files = {}
    for kind in KINDS:
        tensors = {name: (kind, random_blocks(kind, 8, K, rng))
                   for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight")}
        files[kind] = (write_layer_file(tmp_path_factory.mktemp(kind) / "layers.gguf", tensors), tensors)
    return files


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_convert_bit_exactly(layer_files, kind):
    path, tensors = layer_files[kind]
    config = GGUFConfig.from_file(path)
    weights = dict(iterate_weights(resolve_model(str(path))))
    layer = ColumnParallelLinear(K, 8, quant_method=config.linear_method("model.layers.0.mlp.up_proj"))
    load_layer(layer, weights, ["model.layers.0.mlp.up_proj.weight"], [None])
    expected = torch.from_numpy(gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"][1],
                                                       gguf.GGMLQuantizationType[kind]))
    assert torch.equal(layer_weight(layer), expected)
    assert not any(name == "weight" for name, _ in layer.named_parameters()), "the raw blocks stay resident"
    # q rows come un-permuted, as the dequantizing loader gives them
    q = ColumnParallelLinear(K, 8, quant_method=config.linear_method("model.layers.0.self_attn.q_proj"))
    load_layer(q, weights, ["model.layers.0.self_attn.q_proj.weight"], [None])
    assert torch.equal(layer_weight(q), weights["model.layers.0.self_attn.q_proj.weight"].load())
    x = torch.randn(3, K)
    assert torch.allclose(layer(x), x @ expected.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_slices_convert_bit_exactly(layer_files, monkeypatch, kind, rank):
    path, _ = layer_files[kind]
    config = GGUFConfig.from_file(path)
    weights = dict(iterate_weights(resolve_model(str(path))))
    set_tp(monkeypatch, rank, 2)
    column = ColumnParallelLinear(K, 8, quant_method=config.linear_method("model.layers.0.mlp.up_proj"))
    load_layer(column, weights, ["model.layers.0.mlp.up_proj.weight"], [None])
    full_up = weights["model.layers.0.mlp.up_proj.weight"].load()
    assert torch.equal(layer_weight(column), full_up[4 * rank : 4 * rank + 4])
    # row-parallel: this rank's blocks along the input dim
    row = RowParallelLinear(K, 8, quant_method=config.linear_method("model.layers.0.mlp.down_proj"))
    load_layer(row, weights, ["model.layers.0.mlp.down_proj.weight"], [None])
    full_down = weights["model.layers.0.mlp.down_proj.weight"].load()
    assert torch.equal(layer_weight(row), full_down[:, K // 2 * rank : K // 2 * (rank + 1)])
    # permuted q rows, sliced: the permutation applies to the raw rows
    q = ColumnParallelLinear(K, 8, quant_method=config.linear_method("model.layers.0.self_attn.q_proj"))
    load_layer(q, weights, ["model.layers.0.self_attn.q_proj.weight"], [None])
    full_q = weights["model.layers.0.self_attn.q_proj.weight"].load()
    assert torch.equal(layer_weight(q), full_q[4 * rank : 4 * rank + 4])


def test_a_tensor_parallel_size_that_splits_a_block_names_the_layer(layer_files, monkeypatch):
    path, _ = layer_files["Q4_K"]
    config = GGUFConfig.from_file(path)
    set_tp(monkeypatch, 0, 4)                  # 512 / 4 = 128 input features: half a Q4_K block
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.down_proj: .*128 input features.*Q4_K "
                                         r"blocks of 256"):
        RowParallelLinear(K, 8, quant_method=config.linear_method("model.layers.0.mlp.down_proj"))


# -- (e) a fused layer of two block types --------------------------------------------------------------
@pytest.mark.parametrize("v_kind", ["Q6_K", "F16"])
def test_fused_layer_of_two_block_types(tmp_path, v_kind):
    """q/k Q4_K with v Q6_K (as in Q4_K_M files), or with an F16 v (held as a float matrix)."""
    rng = np.random.default_rng(2)
    v = (random_blocks("Q6_K", 4, K, rng) if v_kind == "Q6_K"
         else (0.05 * rng.standard_normal((4, K))).astype(np.float16).view(np.uint8))
    tensors = {"blk.0.attn_q.weight": ("Q4_K", random_blocks("Q4_K", 8, K, rng)),
               "blk.0.attn_k.weight": ("Q4_K", random_blocks("Q4_K", 4, K, rng)),
               "blk.0.attn_v.weight": (v_kind, v)}
    path = write_layer_file(tmp_path / "mixed.gguf", tensors)
    config = GGUFConfig.from_file(path)
    weights = dict(iterate_weights(resolve_model(str(path))))
    layer = QKVParallelLinear(K, head_dim=4, num_heads=2, num_kv_heads=1,
                              quant_method=config.linear_method("model.layers.0.self_attn.qkv_proj"))
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    load_layer(layer, weights, names, ["q", "k", "v"])
    pieces = layer.quant_method.pieces
    assert [tuple(p.shape) for p in pieces] == [(12, K), (4, K)], "q+k one GEMM, v another"
    assert pieces[0].bits == 4 and (pieces[1].bits == 6 if v_kind == "Q6_K" else pieces[1].dtype == torch.float32)
    expected = torch.cat([weights[name].load() for name in names])
    assert torch.equal(layer_weight(layer), expected)
    x = torch.randn(5, K)
    assert torch.allclose(layer(x), x @ expected.T, rtol=1e-5, atol=1e-6)


# -- file-level: the config, the registry, errors -------------------------------------------------------
def test_registry_keeps_gguf_quantized_on_cuda_or_when_asked(model_files):
    source = resolve_model(str(model_files("q4_1-q8_0-tied")))
    hf_config = load_hf_config(source)
    assert resolve_quantization(None, hf_config, source, torch.device("cpu")) is None
    for requested, device in (("gguf", "cpu"), (None, "cuda"), ("gguf", "cuda")):
        config = resolve_quantization(requested, hf_config, source, torch.device(device))
        assert isinstance(config, GGUFConfig)
    # 2 layers x 7 linear layers Q4_1, the tied embedding Q8_0; Q4_1 and Q8_0 are held at the file's size
    file_bytes = sum(t.n_bytes for t in read_gguf_index(source.gguf_file).tensors if t.tensor_type.name != "F32")
    assert config.describe() == f"GGUF Q4_1 (14 tensors), Q8_0 (1) kept quantized, {file_bytes / 1e6:.0f} MB"
    with pytest.raises(ValueError, match=r"quantization='gptq' does not apply to a GGUF file"):
        resolve_quantization("gptq", hf_config, source, torch.device("cpu"))
    assert resolve_quantization("fp8", hf_config, source, torch.device("cpu")).name == "fp8"


def test_unsupported_block_type_names_the_tensor(tmp_path):
    q3_k = np.random.default_rng(0).integers(0, 256, size=(4, 110), dtype=np.uint8)      # one 256-block a row
    tensors = {"blk.0.ffn_up.weight": ("Q3_K", q3_k)}
    path = write_layer_file(tmp_path / "q3.gguf", tensors)
    message = (r"GGUF tensor 'blk\.0\.ffn_up\.weight' in .*q3\.gguf' has block type Q3_K, which cannot be kept "
               r"quantized; supported: \['Q4_0', 'Q4_1', 'Q8_0', 'Q4_K', 'Q6_K', 'Q5_0', 'Q5_1', 'Q5_K'\]")
    with pytest.raises(ValueError, match=message):
        GGUFConfig.from_file(path)


def test_float_weights_stay_unquantized(tiny_gguf):
    """An F16 file under gguf: every layer loads as before (nothing to keep quantized)."""
    config = GGUFConfig.from_file(tiny_gguf(TinyModelSpec(), "F16"))
    assert config.linear_method("model.layers.0.self_attn.qkv_proj").name == "unquantized"
    assert config.embedding_method("model.embed_tokens") is None
    assert config.describe() == "GGUF float weights only (nothing kept quantized)"


# -- (b) engines: kept quantized vs dequantized vs transformers ------------------------------------------
def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32, local_files_only=True)
    return [hf_greedy_generate(model, prompt, max_new_tokens) for prompt in prompts]


def chosen_logprobs(output) -> list[float]:
    completion = output.outputs[0]
    return [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)]


@pytest.mark.parametrize("name", ["q4_1-q8_0-tied", "q4_k_m", "qwen2-q4_k_m", "q5_k_m", "q5_0-q5_1"])
def test_engine_kept_quantized_equals_dequantized_and_transformers(model_files, name):
    path = model_files(name)
    prompts = token_prompts(4)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    kept = LLM(model=str(path), quantization="gguf", kv_cache_memory_bytes=KV_BYTES)
    assert isinstance(kept.engine.config.model.quantization, GGUFConfig)
    ours = kept.generate(inputs, greedy(8, logprobs=1), use_tqdm=False)
    plain = LLM(model=str(path), kv_cache_memory_bytes=KV_BYTES)
    assert plain.engine.config.model.quantization is None          # CPU default: dequantized at load
    reference = plain.generate(inputs, greedy(8, logprobs=1), use_tqdm=False)
    for got, want in zip(ours, reference, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert chosen_logprobs(got) == pytest.approx(chosen_logprobs(want), abs=LOGPROB_ATOL_SAME_WEIGHTS)
    for got, (hf_tokens, hf_logprobs) in zip(ours, hf_greedy(path, prompts, 8), strict=True):
        assert got.outputs[0].token_ids == hf_tokens
        assert chosen_logprobs(got) == pytest.approx(hf_logprobs, abs=LOGPROB_ATOL_HF)


# -- (c) what stays resident ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Q4_0", "q4_1-q8_0-tied", "Q8_0", "Q4_K", "Q6_K", "q4_k_m"])
def test_resident_weights_are_the_files_size(model_files, name):
    path = model_files(name)
    file_bytes = sum(t.n_bytes for t in read_gguf_index(path).tensors)
    model = build_model(path, GGUFConfig.from_file(path))
    held = held_weight_bytes(model)
    assert abs(held - file_bytes) <= 0.10 * file_bytes, (held, file_bytes)
    dequantized = held_weight_bytes(build_model(path, None))
    assert held < dequantized / 3                 # float32 would take 32 bits a weight


@pytest.mark.parametrize("name,kinds", [("q5_k_m", {"Q5_K": 6.625, "Q6_K": 6.5625}),
                                        ("q5_0-q5_1", {"Q5_0": 6.5, "Q5_1": 7.0, "Q8_0": 8.5})])
def test_resident_five_bit_types_take_one_bit_a_weight_more(model_files, name, kinds):
    """Q5_0 / Q5_1 / Q5_K ride on the 6-bit planes: exactly one bit a value more than the file."""
    path = model_files(name)
    tensors = read_gguf_index(path).tensors
    float_bytes = sum(t.n_bytes for t in tensors if t.tensor_type.name == "F32")
    values = {kind: sum(t.n_elements for t in tensors if t.tensor_type.name == kind) for kind in kinds}
    assert all(values.values()), values
    model = build_model(path, GGUFConfig.from_file(path))
    assert held_weight_bytes(model) == sum(values[kind] * bits / 8 for kind, bits in kinds.items()) + float_bytes
    assert GGUFConfig.from_file(path).held_bytes() == held_weight_bytes(model) - float_bytes
    file_bytes = sum(t.n_bytes for t in tensors if t.tensor_type.name in kinds)
    assert held_weight_bytes(model) - float_bytes <= 1.25 * file_bytes


def test_resident_q6_k_is_the_files_6_56_bits_a_weight(model_files):
    """Q6_K is held as in the file: a 4-bit and a 2-bit plane, an int8 scale per 16 values and an fp16
    d per 256: 4 + 2 + 8/16 + 16/256 = 6.5625 bits a weight, exactly the file's."""
    path = model_files("Q6_K")
    tensors = read_gguf_index(path).tensors
    q6_values = sum(t.n_elements for t in tensors if t.tensor_type.name == "Q6_K")
    float_bytes = sum(t.n_bytes for t in tensors if t.tensor_type.name == "F32")
    model = build_model(path, GGUFConfig.from_file(path))
    assert held_weight_bytes(model) == q6_values * 6.5625 / 8 + float_bytes
    assert sum(t.n_bytes for t in tensors if t.tensor_type.name == "Q6_K") == q6_values * 6.5625 / 8
    assert GGUFConfig.from_file(path).held_bytes() == q6_values * 6.5625 / 8


# -- (d) tensor parallelism ----------------------------------------------------------------------------
def test_tp2_equals_tp1(model_files):
    """Each rank: its rows of q/k/v (Q4_K + Q6_K) and gate/up, its 256-blocks of o/down's inputs, its
    vocabulary rows of the tied Q8_0 embedding and LM head (TP=2 over gloo)."""
    path = str(model_files("q4_k_m-q8_0-tied"))
    inputs = [{"prompt_token_ids": p} for p in token_prompts(4)]
    params = greedy(8, logprobs=1)
    expected = LLM(model=path, quantization="gguf", kv_cache_memory_bytes=KV_BYTES).generate(
        inputs, params, use_tqdm=False)
    llm = LLM(model=path, quantization="gguf", tensor_parallel_size=2, kv_cache_memory_bytes=KV_BYTES)
    try:
        actual = llm.generate(inputs, params, use_tqdm=False)
    finally:
        llm.shutdown()
    for got, want in zip(actual, expected, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert chosen_logprobs(got) == pytest.approx(chosen_logprobs(want), abs=1e-4)


def test_dummy_weights_are_finite(model_files):
    """--load-format dummy: random blocks with small finite scales, converted like loaded ones."""
    llm = LLM(model=str(model_files("q4_k_m")), quantization="gguf", load_format="dummy",
              kv_cache_memory_bytes=KV_BYTES)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], greedy(4, logprobs=0), use_tqdm=False)[0]
    assert all(np.isfinite(lp) for lp in chosen_logprobs(out))


# -- (f) the default model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_kept_quantized(default_source):
    """SmolLM2-135M Q4_1 (Q8_0 tied embedding) kept quantized on CPU: the weights held are the file's
    tensor bytes (Q4_1 and Q8_0 convert at their own size), and greedy output equals the dequantized path."""
    kept = LLM(model="default", quantization="gguf", kv_cache_memory_bytes=KV_BYTES)
    model = kept.engine.core.executor.runner.model
    tensor_bytes = sum(t.n_bytes for t in read_gguf_index(default_source.gguf_file).tensors)
    held = held_weight_bytes(model)
    assert abs(held - tensor_bytes) <= 0.02 * tensor_bytes, (held, tensor_bytes)
    assert held < default_source.gguf_file.stat().st_size            # ~98 MB with the vocabulary
    assert kept.engine.config.model.quantization.describe() == \
        "GGUF Q4_1 (210 tensors), Q8_0 (1) kept quantized, 96 MB"
    plain = LLM(model="default", kv_cache_memory_bytes=KV_BYTES)
    prompt = ["The capital of France is"]
    ours = kept.generate(prompt, greedy(8, logprobs=0), use_tqdm=False)[0]
    reference = plain.generate(prompt, greedy(8, logprobs=0), use_tqdm=False)[0]
    assert ours.outputs[0].token_ids == reference.outputs[0].token_ids
    assert chosen_logprobs(ours) == pytest.approx(chosen_logprobs(reference), abs=1e-4)
