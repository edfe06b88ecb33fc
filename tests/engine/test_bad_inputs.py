"""Every bad input raises ValueError naming the parameter and the value, and the engine keeps
serving (nothing half-queued)."""
from __future__ import annotations

import pytest

from conftest import greedy, token_prompts
from pagoda.engine import SamplingParams


@pytest.mark.parametrize("kwargs, pattern", [
    ({"temperature": -0.5}, r"temperature .*-0\.5"),
    ({"top_p": 0.0}, r"top_p .*0\.0"),
    ({"top_p": 1.5}, r"top_p .*1\.5"),
    ({"n": 0}, r"n must be .*0"),
    ({"max_tokens": 0}, r"max_tokens .*0"),
    ({"min_tokens": 5, "max_tokens": 2}, r"min_tokens.*5.*max_tokens=2"),
    ({"stop": ["ok", ""]}, r"stop .*''"),
    ({"min_p": 2.0}, r"min_p .*2\.0"),
    ({"presence_penalty": 3.0}, r"presence_penalty .*3\.0"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty .*0\.0"),
    ({"logprobs": -1}, r"logprobs .*-1"),
])
def test_bad_sampling_params(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_engine_keeps_serving(make_llm):
    llm = make_llm()
    good = {"prompt_token_ids": token_prompts(3)[2]}
    max_len = llm.engine.config.model.max_model_len
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate([good, ""], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate([{"prompt_token_ids": []}], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match=r"token id 100000 is outside the vocabulary \[0, 512\)"):
        llm.generate([good, {"prompt_token_ids": [5, 100000]}], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match=r"token id -1 "):
        llm.generate([{"prompt_token_ids": [-1]}], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match=rf"prompt has {max_len + 5} tokens, but max_model_len is {max_len}"):
        llm.generate([{"prompt_token_ids": [5] * (max_len + 5)}], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match=r"stop_token_ids contains 9999"):
        llm.generate([good], greedy(4, stop_token_ids=[9999]), use_tqdm=False)
    # nothing was queued by the failed calls, and the engine still serves
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([good], greedy(4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_engine_arguments(tiny_checkpoint, tmp_path):
    from pagoda.engine.llm import LLM

    with pytest.raises(ValueError, match="does-not-exist"):
        LLM(model=str(tmp_path / "does-not-exist"))
    import json

    model_dir = tiny_checkpoint()
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPTBigCodeForCausalLM"]
    config["model_type"] = "llama"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'GPTBigCodeForCausalLM' is not supported; supported architectures: "
                                         r"(\w+ForCausalLM, )+Qwen3ForCausalLM"):
        LLM(model=str(odd))
    with pytest.raises(ValueError, match=r"max_num_seqs must be .*0"):
        LLM(model=str(model_dir), max_num_seqs=0)
    with pytest.raises(ValueError, match=r"dtype must be .*'float8'"):
        LLM(model=str(model_dir), dtype="float8")
    with pytest.raises(ValueError, match=r"unknown LLM argument\(s\) \['max_num_seq'\]"):
        LLM(model=str(model_dir), max_num_seq=4)
    with pytest.raises(ValueError, match=r"max_model_len=100000 exceeds the model's limit of 256"):
        LLM(model=str(model_dir), max_model_len=100000)
    with pytest.raises(ValueError, match=r"max_model_len=200 needs more KV cache"):
        LLM(model=str(model_dir), max_model_len=200, kv_cache_memory_bytes=4 * 2 * 2 * 16 * 64 * 4)


def test_a_request_whose_core_id_is_taken_is_refused_whole(make_llm):
    # "x#1" is the core id of the second completion of request "x" (n=2): a request named "x#1" collides
    llm = make_llm()
    prompt = {"prompt_token_ids": token_prompts(3)[2]}
    engine = llm.engine
    engine.add_request("x", prompt, greedy(50, n=2))
    with pytest.raises(ValueError, match=r"'x#1' is already running"):
        engine.add_request("x#1", prompt, greedy(4))
    assert not engine.output_processor.has("x#1"), "the refused request must leave nothing behind"
    engine.abort_request(["x"])
    assert not engine.has_unfinished_requests()
    assert len(llm.generate([prompt], greedy(4), use_tqdm=False)[0].outputs[0].token_ids) == 4
