"""engine/utils/startup_timeline.py on a fake clock: where each phase begins (the thread's previous
mark, `begin()`, or the process's start), spans left out of the mark that contains them, silence
after `ready()`, and the stderr fallback of a process where nothing configured logging."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading

import pytest

from pagoda.engine.utils import startup_timeline


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch, caplog):
    """A fresh timeline whose process started at 0.0 on a fake clock; INFO lines captured."""
    fake = FakeTime()
    monkeypatch.setattr(startup_timeline, "time", fake)
    monkeypatch.setattr(startup_timeline, "_origin", 0.0)
    monkeypatch.setattr(startup_timeline, "_closed", False)
    monkeypatch.setattr(startup_timeline, "_thread_state", threading.local())
    caplog.set_level(logging.INFO, logger="pagoda.startup")
    return fake


def lines(caplog) -> list[str]:
    """The timeline's messages without their `; <process> pid <pid>` tail."""
    return [re.sub(r"; \S+ pid \d+\)$", ")", record.getMessage())
            for record in caplog.records if record.name == "pagoda.startup"]


def test_marks_chain_and_leave_out_the_spans_inside_them(clock, caplog):
    clock.now = 3.0
    startup_timeline.mark("imports")                   # the first mark: since the process started
    clock.now = 3.5
    with startup_timeline.span("tokenizer"):           # 3.5 -> 4.5, inside the next mark's phase
        with startup_timeline.span("inner"):           # nested: counted once, in its outer span
            clock.now = 4.0
        clock.now = 4.5
    clock.now = 6.0
    startup_timeline.mark("engine core")               # 3.0 -> 6.0 less the outer span's 1.0 s
    assert lines(caplog) == ["start-up: imports 3.00 s (at 3.0 s)", "start-up: inner 0.50 s (at 4.0 s)",
                             "start-up: tokenizer 1.00 s (at 4.5 s)", "start-up: engine core 2.00 s (at 6.0 s)"]


def test_begin_starts_a_chain_on_its_own_thread(clock, caplog):
    clock.now = 2.0
    startup_timeline.mark("imports")

    def core_thread() -> None:
        startup_timeline.begin()                        # at 2.0
        clock.now = 5.0
        startup_timeline.mark("weights")

    thread = threading.Thread(target=core_thread)
    thread.start()
    thread.join()
    clock.now = 5.5
    startup_timeline.mark("engine core")               # the main thread's chain: since its mark at 2.0
    assert lines(caplog) == ["start-up: imports 2.00 s (at 2.0 s)", "start-up: weights 3.00 s (at 5.0 s)",
                             "start-up: engine core 3.50 s (at 5.5 s)"]


def test_ready_logs_the_whole_start_up_then_nothing(clock, caplog):
    calls = []

    @startup_timeline.span("decorated")
    def work(x: int) -> int:
        calls.append(x)
        return 2 * x

    clock.now = 7.25
    startup_timeline.ready("replica constructed")
    startup_timeline.mark("late")
    startup_timeline.begin()
    with startup_timeline.span("late span"):
        pass
    assert work(21) == 42 and calls == [21]            # a decorated function still runs
    startup_timeline.ready()
    assert lines(caplog) == ["start-up: replica constructed 7.25 s (at 7.2 s)"]


def test_a_span_that_raises_logs_nothing(clock, caplog):
    with pytest.raises(ValueError):
        with startup_timeline.span("tokenizer"):
            raise ValueError("no tokenizer")
    clock.now = 1.0
    startup_timeline.mark("config")
    assert lines(caplog) == ["start-up: config 1.00 s (at 1.0 s)"]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_process_without_logging_still_prints_its_timeline():
    # e.g. the spawned engine core: nothing configured logging there
    result = run_python("from pagoda.engine.utils import startup_timeline as t; t.mark('imports'); t.ready()")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("pagoda.startup: start-up: ") == 2
    assert " pagoda.startup: start-up: imports " in result.stderr and "; MainProcess pid " in result.stderr


def test_a_process_that_configured_logging_decides():
    result = run_python("import logging; logging.basicConfig(level=logging.WARNING); "
                        "from pagoda.engine.utils import startup_timeline as t; t.mark('imports')")
    assert result.returncode == 0 and "start-up" not in result.stderr, result.stderr
