"""Makes an INT4 (W4A16, GPTQ) checkpoint of a model with llm-compressor, for `bench/perplexity.py --extra`.

    python -m bench.quantize_gptq --model default --out /tmp/smollm2-w4a16
    python -m bench.perplexity --extra int4-gptq=/tmp/smollm2-w4a16

llm-compressor is not a pagoda dependency (it pins its own transformers and compressed-tensors
versions): run this in an environment that has it. The result is a compressed-tensors
`pack-quantized` checkpoint (4-bit weights, groups of --group-size (64 by default: the default model's 576 columns are no multiple of 128), symmetric; the LM head and embedding kept),
which pagoda loads as it loads any llm-compressor output.

The model: a Hugging Face directory, or `default`, whose GGUF file transformers dequantizes (so
the INT4 weights are GPTQ'd from the same weights the other variants start from). Calibration text:
the repository's own Markdown documentation (English prose, ours), never the perplexity text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def calibration_texts(num_samples: int) -> list[str]:
    """Paragraphs of the repository's Markdown files, cycled to `num_samples`."""
    paragraphs = []
    for file in sorted(REPO.glob("**/*.md")):
        if ".venv" in file.parts or "site-packages" in file.parts:
            continue
        paragraphs += [p.strip() for p in file.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 200]
    if not paragraphs:
        raise SystemExit("no calibration text found")
    return [paragraphs[i % len(paragraphs)] for i in range(num_samples)]


def _tolerate_unhashable_datasets() -> None:
    """NOTE: `datasets` fingerprints every dataset by pickling it, which fails for some pyarrow/dill
    pairs (a pyarrow type "not found as builtins"); a fingerprint only names cache entries, so an
    unpicklable value gets a random one instead of stopping the run."""
    import uuid

    from datasets import fingerprint

    original = fingerprint.Hasher.hash.__func__

    def tolerant(cls, value):  # type: ignore[no-untyped-def]
        try:
            return original(cls, value)
        except Exception:
            return uuid.uuid4().hex

    fingerprint.Hasher.hash = classmethod(tolerant)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asymmetric", action="store_true", help="zero points per group (as GGUF's Q4_1 has mins)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=512)
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagoda.engine.model_loader.model_source import resolve_model

    _tolerate_unhashable_datasets()

    source = resolve_model(args.model)
    kwargs = {"gguf_file": source.gguf_file.name} if source.gguf_file is not None else {}
    directory = str(source.gguf_file.parent if source.gguf_file is not None else source.path)
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **kwargs)
    if kwargs:
        # llm-compressor re-reads the config from the model's directory: give it a Hugging Face one
        plain = args.out.with_name(args.out.name + "-bf16")
        model.hf_quantizer = None                     # the GGUF is dequantized already: plain bf16 weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(plain)
        tokenizer.save_pretrained(plain)
        model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
    texts = calibration_texts(args.samples)
    encoded = [tokenizer(text, truncation=True, max_length=args.max_seq_len) for text in texts]
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in encoded],
                                 "attention_mask": [e["attention_mask"] for e in encoded]})
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups={"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": not args.asymmetric, "strategy": "group",
                    "group_size": args.group_size}}})
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=args.max_seq_len,
            num_calibration_samples=len(texts))
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
