"""``python -m training.run`` as a person runs it: SIGKILL mid-epoch then ``--resume`` gives a
valid run (checkpoint loads, training finishes, the model is exported and servable); unreadable
images in the training folder are skipped with a warning, not a crash."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from live_server import ROOT
from PIL import Image
from reliability import record

pytest.importorskip("torch")

TINY = [
    "--arch", "vit_tiny", "--patch-size", "4", "--vit-depth", "1", "--global-size", "16",
    "--local-size", "8", "--n-local-crops", "1", "--out-dim", "64", "--head-hidden-dim", "64",
    "--head-bottleneck-dim", "32", "--batch-size", "8", "--num-workers", "0",
    "--eval-resize", "16", "--eval-crop", "16", "--warmup-epochs", "1", "--precision", "fp32",
    "--threads", "1", "--time-budget-min", "none",
]  # fmt: skip


def digits_folder(root: Path, n: int) -> Path:
    """sklearn's digits as 16x16 PNGs in one subfolder per class (real, offline, labelled)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(n):
        folder = root / f"digit{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 255 / 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).convert("RGB").save(folder / f"{i}.png")
    return root


def train_cmd(data: Path, out: Path, models: Path, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "training.run", "--data", str(data), "--out", str(out),
        "--models-dir", str(models), "--epochs", str(epochs), *TINY, *extra,
    ]  # fmt: skip


def resume_cmd(out: Path, models: Path | None = None, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "training.run", "--out", str(out), "--resume", *extra]
    return cmd + (["--models-dir", str(models)] if models else [])


def run(cmd: list[str], log: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        return subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=out, timeout=timeout)


def check_servable(model_dir: Path) -> None:
    """The exported artifact loads and runs as the server would run it."""
    import onnxruntime as ort

    from artifact import load_manifest

    manifest = load_manifest(model_dir)
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    (embedding,) = session.run(["embedding"], {"pixel_values": pixels})
    assert embedding.shape == (2, manifest.embedding_dim) and np.isfinite(embedding).all()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_a_valid_run(tmp_path):
    from training.checkpoints import read_checkpoint
    from training.trainer import CHECKPOINT_NAME

    data = digits_folder(tmp_path / "images", 240)  # 30 steps an epoch: ~2 s to land inside
    out, models, log = tmp_path / "run", tmp_path / "models", tmp_path / "train.log"
    epochs = 3
    rng = random.Random(3)
    proc = subprocess.Popen(
        train_cmd(data, out, models, epochs),
        cwd=ROOT,
        stdout=open(log, "w"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
    )
    checkpoint = out / CHECKPOINT_NAME
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), log.read_text()[-3000:]
    time.sleep(rng.uniform(0.2, 0.8))  # inside epoch 2 (an epoch takes ~1-3 s here)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    killed_at = read_checkpoint(checkpoint)["epoch"]  # what the kill left on disk still loads
    assert 1 <= killed_at < epochs
    assert not (out / "summary.json").exists() and not models.exists()

    resumed = run(resume_cmd(out, models), log)  # as documented: only --out and --resume
    text = log.read_text()
    assert resumed.returncode == 0, text[-3000:]
    assert read_checkpoint(checkpoint)["epoch"] == epochs
    summary = json.loads((out / "summary.json").read_text())
    model_dir = Path(summary["export"])
    assert model_dir.parent == models
    check_servable(model_dir)
    record(
        "training_kill_resume",
        {"epochs": epochs, "killed_after_epoch": killed_at, "resumed": True, "exported": True},
    )


def test_unreadable_training_images_are_skipped_with_a_warning(tmp_path):
    data = digits_folder(tmp_path / "images", 48)
    good = (data / "digit0" / "0.png").read_bytes()
    bad = {
        "digit0/truncated.png": good[: len(good) // 2],  # header fine, body cut: fails on load
        "digit1/notes.jpg": b"this is text, not a JPEG",
        "digit2/empty.png": b"",
        "digit3/bomb.png": _png_header(100_000, 100_000),
    }
    for name, blob in bad.items():
        (data / name).write_bytes(blob)
    out, log = tmp_path / "run", tmp_path / "train.log"
    done = run(train_cmd(data, out, tmp_path / "models", 2, "--no-export"), log)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    warnings = [line for line in text.splitlines() if "skipping unreadable image" in line]
    for name in ("notes.jpg", "empty.png", "bomb.png"):  # refused when the folder is scanned
        assert any(name in line for line in warnings), (name, warnings)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    record("training_corrupt_images", {"bad_files": len(bad), "warnings": len(warnings)})


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_the_documented_resume_command_is_accepted(tmp_path):
    data = digits_folder(tmp_path / "images", 16)
    out, log = tmp_path / "run", tmp_path / "train.log"
    assert run(train_cmd(data, out, tmp_path / "models", 1, "--no-export"), log).returncode == 0
    cmd = [sys.executable, "-m", "training.run", "--out", str(out), "--resume", "--no-export"]
    again = run(cmd, log)
    assert again.returncode == 0, log.read_text()[-2000:]
