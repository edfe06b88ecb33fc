"""Greedy tokens and logprobs against Hugging Face transformers on the same weights (fp32, CPU).

Tolerance for logprobs: 2e-4 absolute (fp32; the two implementations sum in different orders).
"""
from __future__ import annotations

import model_factory
import pytest
import torch
import transformers
from conftest import greedy, token_prompts
from model_factory import TinyModelSpec

LOGPROB_ATOL = 2e-4

SPECS = [
    pytest.param(TinyModelSpec(family="llama"), id="llama-gqa-hd64"),
    pytest.param(TinyModelSpec(family="llama", head_dim=128, num_attention_heads=4, num_key_value_heads=2),
                 id="llama-hd128"),
    pytest.param(TinyModelSpec(family="llama", rope_scaling=True, tie_word_embeddings=True), id="llama3-rope-tied"),
    pytest.param(TinyModelSpec(family="mistral", num_attention_heads=4, num_key_value_heads=4), id="mistral-mha"),
    pytest.param(TinyModelSpec(family="qwen2"), id="qwen2-bias"),
    pytest.param(TinyModelSpec(family="qwen3", head_dim=128), id="qwen3-qknorm"),
]


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None      # ignore EOS, as the engine's ignore_eos does
    results = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        results.append((tokens, logprobs))
    return results


@pytest.mark.parametrize("spec", SPECS)
def test_greedy_tokens_and_logprobs_match_hf(make_llm, tiny_checkpoint, spec):
    prompts = token_prompts(10, vocab=spec.vocab_size)
    llm = make_llm(spec)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(16, logprobs=1), use_tqdm=False)
    expected = hf_greedy(tiny_checkpoint(spec), prompts, 16)
    for prompt, output, (hf_tokens, hf_logprobs) in zip(prompts, outputs, expected):
        completion = output.outputs[0]
        assert completion.token_ids == hf_tokens, f"prompt of {len(prompt)} tokens"
        ours = [entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids)]
        assert ours == pytest.approx(hf_logprobs, abs=LOGPROB_ATOL)
        assert completion.cumulative_logprob == pytest.approx(sum(hf_logprobs), abs=LOGPROB_ATOL * 16)


def test_prompt_logprobs_match_hf(make_llm, tiny_checkpoint):
    spec = TinyModelSpec()
    prompt = token_prompts(10)[8]
    llm = make_llm(spec)
    out = llm.generate([{"prompt_token_ids": prompt}], greedy(2, prompt_logprobs=2), use_tqdm=False)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint(spec), dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert entry[prompt[i]].logprob == pytest.approx(logprobs[i - 1, prompt[i]].item(), abs=LOGPROB_ATOL)
        top2 = logprobs[i - 1].topk(2).indices.tolist()
        assert set(top2) <= set(entry)


def test_gguf_checkpoint_matches_its_source(make_llm, tiny_checkpoint, tiny_gguf):
    """The GGUF path (dequantize + q/k un-permutation) gives the same model as the safetensors one."""
    spec = TinyModelSpec()
    prompts = token_prompts(4)
    from pagoda.engine.llm import LLM

    from_gguf = LLM(model=str(tiny_gguf(spec, "F32")), kv_cache_memory_bytes=16 << 20)
    from_hf = make_llm(spec)
    a = from_gguf.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    b = from_hf.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.slow
def test_default_model_matches_hf_gguf_load():
    """SmolLM2-135M from the GGUF: our engine vs transformers loading the same file."""
    from pagoda.engine.llm import LLM
    from pagoda.engine.model_loader.model_source import resolve_model

    source = resolve_model("default")
    llm = LLM(model="default")
    tokenizer = llm.get_tokenizer()
    texts = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
             "Water boils at a temperature of", "1, 2, 3, 4,"]
    prompts = [tokenizer.encode(t) for t in texts]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12, logprobs=0), use_tqdm=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(source.path), gguf_file=str(source.gguf_file), dtype=torch.float32)
    model.generation_config.eos_token_id = None
    for prompt, output in zip(prompts, outputs):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        ref_tokens = ref.sequences[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == ref_tokens
        ref_logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(ref.logits, ref_tokens)]
        ours = [e[t].logprob for e, t in zip(output.outputs[0].logprobs, ref_tokens)]
        assert ours == pytest.approx(ref_logprobs, abs=2e-3)
    # the chat template comes from the GGUF too
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    greedy(12), use_tqdm=False)[0]
    assert "Paris" in chat.outputs[0].text
