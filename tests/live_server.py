"""A live ``python -m service`` (uvicorn) subprocess on a free loopback port, for tests that need
real process behaviour: kill -9, SIGTERM, startup refusals, a browser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveProcess:
    """A command that ends up serving HTTP on ``self.port`` (DINO_PORT), its output in ``log``.

    The environment starts without any DINO_* variable of the caller's, so tests are hermetic.
    """

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DINO_")},
            "DINO_PORT": str(self.port),
            "DINO_THREADS": "1",
            **(env or {}),
        }
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=out, stderr=out)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited early ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and the exit code; kill -9 if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self.proc.returncode


class Server(LiveProcess):
    """``python -m service`` over one model folder and a data directory."""

    def __init__(
        self, model_dir: Path, data_dir: Path, log: Path, env: dict[str, str] | None = None
    ) -> None:
        settings = {
            "DINO_MODELS_DIR": str(model_dir.parent),
            "DINO_MODEL": model_dir.name,
            "DINO_DATA_DIR": str(data_dir),
            "DINO_ENGINE": "onnxruntime",  # the reference engine, as in conftest.py
        }
        super().__init__([sys.executable, "-m", "service"], log, {**settings, **(env or {})})
