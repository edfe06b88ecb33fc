"""What the engine's spawned processes share (TP workers, the engine core): stopping them, how one
ended, in words, and how a child leaves when its parent is gone."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

PARENT_POLL_INTERVAL_S = 0.5


def stop_children(children: list[tuple[Any, Any]], grace_s: float, terminate_wait_s: float) -> None:
    """(process, its command pipe) pairs: closes every pipe (a child leaves its loop on EOF), waits up
    to `grace_s` in all, then terminates what is left, waits up to `terminate_wait_s` for each, and
    kills the rest. Safe to call twice."""
    for _, conn in children:
        conn.close()
    deadline = time.monotonic() + grace_s
    for process, _ in children:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process, _ in children:
        if process.is_alive():
            process.terminate()
    for process, _ in children:
        process.join(timeout=terminate_wait_s)
        if process.is_alive():
            # SIGTERM stays pending on a stopped (SIGSTOP) process; SIGKILL does not.
            process.kill()
            process.join()


def how_it_ended(process: Any) -> str:
    """'was killed by SIGKILL', 'exited with code 1', or 'closed its pipe' (still running); waits up
    to a second for the process to end first."""
    process.join(timeout=1.0)
    code = process.exitcode
    if code is None:
        return "closed its pipe"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def exit_when_parent_dies(parent_pid: int) -> None:
    """Run in a daemon thread of the child: exits the process once its parent is gone (the child is
    then re-parented), even while the main thread is blocked in a step or a collective, which
    releases the GIL."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_INTERVAL_S)
    os._exit(1)


def leave(code: int) -> None:
    """Exits at once, skipping the interpreter's teardown (module and tensor finalization that no one
    waits for; the OS reclaims the rest)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
