"""A real 2-process DDP run on CPU (gloo) through torchrun and ``python -m training.run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from training.distributed import DistInfo, init_distributed


def test_without_torchrun_it_is_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.distributed


@pytest.mark.slow
def test_two_process_ddp_run_writes_one_checkpoint(tmp_path):
    d = load_digits()
    for i, (image, label) in enumerate(zip(d.images[:64], d.target[:64], strict=True)):
        folder = tmp_path / "data" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((16, 16)).save(
            folder / f"{i}.png"
        )
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone", "-m", "training.run",
        "--data", str(tmp_path / "data"), "--out", str(out), "--no-export", "--device", "cpu",
        "--patch-size", "4", "--vit-depth", "1", "--global-size", "16", "--local-size", "8",
        "--n-local-crops", "1", "--eval-resize", "16", "--eval-crop", "16", "--out-dim", "64",
        "--head-hidden-dim", "64", "--head-bottleneck-dim", "32", "--batch-size", "8",
        "--epochs", "1", "--num-workers", "0", "--time-budget-min", "none",
        "--warmup-epochs", "0", "--precision", "fp32", "--log-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint.pth").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 1  # rank 0 alone writes
    # 64 images minus the k-NN hold-out, 8 per step over both ranks (4 each).
    assert epochs[0]["iteration"] == len([r for r in rows if r["kind"] == "step"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["knn"]["n_test"] > 0
    assert "over 2 process(es)" in proc.stderr and "backend gloo" in proc.stderr
