"""`python -m service` refuses a configuration it cannot serve with one line that says what to do
(in a container that line is the whole log); tests/test_container_build.py covers folder
permissions, which need a user other than root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _start(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DINO_")}
    return subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("port", ["http", "70000"])
def test_bad_port_is_one_line(tiny_vit_dir, tmp_path, port):
    result = _start(
        {
            "DINO_PORT": port,
            "DINO_MODELS_DIR": str(tiny_vit_dir.parent),
            "DINO_DATA_DIR": str(tmp_path / "data"),
        }
    )
    assert result.returncode == 1
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"cannot start: invalid setting: DINO_PORT='{port}': ")
    assert "DINO_PORT takes a port number 1-65535" in result.stderr


def test_missing_model_is_one_line(tmp_path):
    (tmp_path / "models").mkdir()
    result = _start({"DINO_MODELS_DIR": str(tmp_path / "models"), "DINO_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"cannot start: no model in {tmp_path / 'models'}" in result.stderr
    assert "python -m training.export" in result.stderr
    assert not (tmp_path / ".lock").exists()  # nothing was opened
