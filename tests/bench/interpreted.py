"""Runs a bench module's `main(argv)` in the Triton interpreter, in a subprocess (the interpreter is
chosen when Triton kernels are first imported, so it cannot be switched on in the test process), with
no GPU visible, and returns what `main` returned (JSON-encoded on the child's last stdout line) and
the child's whole stdout/stderr."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_main(module: str, argv: list[str], timeout_s: float = 600) -> tuple[Any, str, str]:
    code = f"import json, {module} as m; print(json.dumps(m.main({argv!r})))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout, done.stderr
