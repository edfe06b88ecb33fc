"""A real `pagoda serve default --standalone --device cpu` process for the console tests (the default
model, so the page shows what a user of `make serve` sees), reusing the server tests' process helpers."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


from entrypoints.server_helpers import ServerProcess, free_port, spawn_server


def start_default_server(log_dir: Path, *flags: str, api_key: Optional[str] = None) -> ServerProcess:
    """`pagoda serve default --standalone --device cpu` on a free port, once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "pagoda.engine.entrypoints.cli", "serve", "default", "--standalone",
               "--port", str(port), "--device", "cpu", "--uvicorn-log-level", "warning", *flags]
    if api_key:
        command += ["--api-key", api_key]
    return spawn_server(command, port, log_dir / f"console-server-{port}.log", api_key)
