"""The main command, scripted on a tiny configuration: train, export, write and index the gallery,
serve; then a second run that reuses the model and the index."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import ROOT, LiveProcess
from PIL import Image
from service_helpers import encode, photo
from sklearn.datasets import load_digits

from training.data import FMNIST_CLASSES

N_TRAIN, N_TEST = 480, 96


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as the Fashion-MNIST distribution ships it (gzipped, unsigned bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory) -> Path:
    """A Fashion-MNIST-format folder made of scikit-learn's digits upscaled to 28 x 28."""
    digits = load_digits()
    images = np.stack(
        [
            np.asarray(Image.fromarray((d * 16).astype(np.uint8)).resize((28, 28), Image.BICUBIC))
            for d in digits.images[: N_TRAIN + N_TEST]
        ]
    )
    labels = digits.target[: N_TRAIN + N_TEST]
    root = tmp_path_factory.mktemp("fmnist")
    write_idx(root / "train-images-idx3-ubyte.gz", images[:N_TRAIN])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:N_TRAIN])
    write_idx(root / "t10k-images-idx3-ubyte.gz", images[N_TRAIN:])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[N_TRAIN:])
    return root


def main_command(tmp: Path, fmnist: Path, log_name: str) -> LiveProcess:
    """``python -m training.quickstart`` as ``make run`` starts it, in its own folders."""
    command = [sys.executable, "-m", "training.quickstart"]
    command += ["--models-dir", str(tmp / "models"), "--data-dir", str(tmp / "data")]
    command += ["--run-dir", str(tmp / "run"), "--fmnist-dir", str(fmnist)]
    # A tiny training: a few seconds of steps, small batches.
    command += ["--", "--time-budget-min", "0.4", "--batch-size", "32", "--epochs", "2"]
    return LiveProcess(command, tmp / log_name)


@pytest.mark.slow
def test_main_command_trains_indexes_and_serves_then_restarts_fast(tiny_fmnist, tmp_path):
    first = main_command(tmp_path, tiny_fmnist, "first.log")
    try:
        first.wait_ready(timeout=600)
        log = first.output()
        assert "training the quickstart model" in log and "indexing the gallery" in log
        assert (tmp_path / "models" / "quickstart" / "manifest.json").is_file()
        assert (tmp_path / "run" / "knn.json").is_file()

        index = httpx.get(f"{first.url}/index").json()
        assert index["count"] == N_TEST + 8  # the test images and the bundled photos

        jpeg = encode(photo("chelsea", 96))
        embed = httpx.post(f"{first.url}/embed", files={"images": ("c.jpg", jpeg)}).json()
        assert embed["model"] == "quickstart" and len(embed["embeddings"][0]) == embed["dim"]
        attention = httpx.post(f"{first.url}/attention", files={"image": ("c.jpg", jpeg)})
        assert attention.status_code == 200, attention.text
        maps = np.asarray(attention.json()["maps"])
        assert np.allclose(maps.reshape(maps.shape[0], -1).sum(axis=1), 1.0, atol=1e-4)

        similar = httpx.get(f"{first.url}/similar", params={"id": "photos:chelsea.jpg", "k": 3})
        results = similar.json()["results"]
        assert len(results) == 3 and "photos:chelsea.jpg" not in [r["id"] for r in results]
        listed = httpx.get(f"{first.url}/items", params={"limit": 200}).json()["items"]
        garments = [item for item in listed if item["id"].startswith("fashion-mnist:")]
        assert len(garments) == N_TEST
        labels = load_digits().target[N_TRAIN:]
        for item in garments:  # class names as metadata, from the test split's labels
            assert item["metadata"]["label"] == FMNIST_CLASSES[labels[item["metadata"]["index"]]]
    finally:
        first.stop()

    second = main_command(tmp_path, tiny_fmnist, "second.log")
    try:
        second.wait_ready(timeout=120)
        log = second.output()
        assert "using the model 'quickstart'" in log
        assert "training the quickstart model" not in log
        assert httpx.get(f"{second.url}/index").json()["count"] == N_TEST + 8
    finally:
        second.stop()


def test_missing_data_set_is_a_message_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.quickstart", "--models-dir", str(tmp_path / "m")]
        + ["--fmnist-dir", str(tmp_path / "nowhere"), "--no-serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
