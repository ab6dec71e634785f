"""Start ``python -m service`` as a child process on a free port and wait for /readyz."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_setting_exists() -> bool:
    """Whether this server reads DINO_ENGINE (settings ignore unknown variables silently, so a
    benchmark must not label an onnxruntime server 'openvino')."""
    from service.settings import Settings

    return "engine" in Settings.model_fields


class Server:
    """A live server; ``cold_start_s`` is process start to the first /readyz 200."""

    def __init__(
        self,
        store: Path,
        model: str,
        data_dir: Path,
        threads: int,
        command: list[str] | None = None,
        **env: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        full_env = {
            **os.environ,
            "DINO_MODELS_DIR": str(store),
            "DINO_MODEL": model,
            "DINO_DATA_DIR": str(data_dir),
            "DINO_PORT": str(self.port),
            "DINO_THREADS": str(threads),
            **{f"DINO_{k.upper()}": v for k, v in env.items()},
        }
        started = time.perf_counter()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "service"],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.cold_start_s = self._wait_ready(started)

    def _wait_ready(self, started: float, timeout: float = 300.0) -> float:
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s; log: {self.log_path}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far, all its threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After the command name: utime and stime are fields 14 and 15 of the whole line.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
