"""Start-up objects are frozen out of GC passes while an engine serves, and handed back after."""
from __future__ import annotations

import gc

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.utils.gc_freeze import freeze_startup_heap, thaw_heap


def test_freeze_then_thaw():
    thaw_heap()
    keep = [[i] for i in range(1000)]             # tracked containers
    freeze_startup_heap()
    assert gc.get_freeze_count() >= len(keep)
    thaw_heap()
    assert gc.get_freeze_count() == 0


def test_engine_freezes_after_start_up_and_thaws_at_shutdown(tiny_checkpoint):
    thaw_heap()
    llm = LLM(model=str(tiny_checkpoint()), enforce_eager=True)
    frozen = gc.get_freeze_count()
    assert frozen > 1000                          # torch, transformers and the model's objects
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4
    llm.shutdown()
    assert gc.get_freeze_count() == 0
