"""``python -m service.index`` end to end: a real exported tiny model, real images, real ORT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from PIL import Image

from artifact import load_manifest
from service.images import decode_image
from service.index import IndexStore
from service.index.build import item_id, load_metadata
from service.preprocess import eval_pixels

PHOTOS = {"astronaut.jpg": "astronaut", "coffee.png": "coffee", "camera.png": "camera"}
NESTED = {"sub/chelsea.png": "chelsea", "sub/deeper/rocket.jpg": "rocket"}


def write_images(root: Path, names: dict[str, str]) -> None:
    for rel, name in names.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(getattr(skimage.data, name)())
        img.thumbnail((96, 96))  # small files keep the test fast; decoding is the same
        img.save(path)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DINO_")}
    clean["DINO_ENGINE"] = "onnxruntime"  # the reference engine: vectors compared to ORT at 1e-5
    return subprocess.run(
        [sys.executable, "-m", "service.index", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**clean, **(env or {})},
    )


def open_for(model_dir: Path, data_dir: Path) -> IndexStore:
    m = load_manifest(model_dir)
    return IndexStore.open(data_dir, m.model_sha256, m.embed_dim, progress=False)


def direct_embedding(model_dir: Path, path: Path) -> np.ndarray:
    """The model run straight in onnxruntime on the manifest's preprocessing."""
    manifest = load_manifest(model_dir)
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    pixels = eval_pixels(decode_image(path.read_bytes(), 10**8), manifest)[None]
    (out,) = session.run(["embedding"], {manifest.input_name: pixels})
    return out[0] / np.linalg.norm(out[0])


def test_ids_and_metadata_files(tmp_path: Path) -> None:
    assert item_id("a/b/c.png") == "a:b:c.png" and item_id("x.jpg") == "x.jpg"
    assert item_id("d/" + "x" * 200).startswith("h:") and item_id("tab\t.png").startswith("h:")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        '{"id": "a/b.png", "label": "cat"}\n\n{"path": "c.png", "metadata": {"k": 1}}\n'
    )
    assert load_metadata(jsonl) == {"a/b.png": {"label": "cat"}, "c.png": {"k": 1}}
    obj = tmp_path / "m.json"
    obj.write_text(json.dumps({"a.png": {"x": 2}}))
    assert load_metadata(obj) == {"a.png": {"x": 2}}
    obj.write_text('[{"label": "no key"}]')
    with pytest.raises(ValueError, match="no string 'id' or 'path'"):
        load_metadata(obj)


def test_build_resume_stats_and_refusals(tiny_vit_dir: Path, tmp_path: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    write_images(images, PHOTOS | NESTED)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("not an image")
    meta = tmp_path / "meta.jsonl"
    meta.write_text(
        json.dumps({"id": "sub/chelsea.png", "label": "cat"})
        + "\n"
        + json.dumps({"id": "astronaut.jpg", "label": "person"})
        + "\n"
    )
    base = ["--models-dir", str(tiny_vit_dir.parent), "--data-dir", str(data), "--no-progress"]

    # Top level only: three photos, the broken file reported, the text file ignored.
    first = cli(
        "build", "--images", str(images), "--metadata", str(meta), *base, "--batch-size", "2"
    )
    assert first.returncode == 0, first.stderr
    assert "4 images found: 3 added, 0 already indexed, 1 failed" in first.stdout
    assert "broken.jpg" in first.stdout

    # Recursive: resumes, skipping what is indexed, and adds the nested images.
    second = cli("build", "--images", str(images), "--recursive", "--metadata", str(meta), *base)
    assert second.returncode == 0, second.stderr
    assert "6 images found: 2 added, 3 already indexed, 1 failed" in second.stdout
    assert "holds 5 items" in second.stdout

    stats = cli("stats", "--data-dir", str(data))
    info = json.loads(stats.stdout)
    assert info["count"] == 5 and info["model_name"] == "tiny-vit" and info["dim"] == 192

    with open_for(tiny_vit_dir, data) as store:
        assert store.existing(["astronaut.jpg", "sub:chelsea.png", "sub:deeper:rocket.jpg"]) == {
            "astronaut.jpg",
            "sub:chelsea.png",
            "sub:deeper:rocket.jpg",
        }
        cat = store.get("sub:chelsea.png")
        assert cat.metadata == {"label": "cat"} and cat.has_thumbnail
        assert cat.source == "sub/chelsea.png"  # below its --images root, no server path
        assert store.get("coffee.png").metadata == {}
        assert store.thumbnail("coffee.png")[:3] == b"\xff\xd8\xff"
        for rel in ["astronaut.jpg", "sub/deeper/rocket.jpg"]:
            expected = direct_embedding(tiny_vit_dir, images / rel)
            np.testing.assert_allclose(store.vector(item_id(rel)), expected, atol=1e-5)
            assert store.search(expected, 1)[0][0].id == item_id(rel)

        # While a process holds the index, the CLI refuses to write to it.
        busy = cli("build", "--images", str(images), *base)
        assert busy.returncode == 2 and "in use by another process" in busy.stderr

    # Bad settings are one clear line, not a traceback.
    refused = cli("build", "--images", str(images), *base, "--model", "nope")
    assert refused.returncode == 2 and "DINO_MODEL='nope'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_rebuild_with_another_model(tiny_vit_dir: Path, tiny_resnet_dir: Path, tmp_path: Path):
    images, data = tmp_path / "images", tmp_path / "data"
    write_images(images, PHOTOS)
    vit = ["--models-dir", str(tiny_vit_dir.parent), "--data-dir", str(data), "--no-progress"]
    res = ["--models-dir", str(tiny_resnet_dir.parent), "--data-dir", str(data), "--no-progress"]
    assert cli("build", "--images", str(images), *vit).returncode == 0
    with open_for(tiny_vit_dir, data) as store:
        store.add(np.ones((1, 192), np.float32), ids=["uploaded"], sources=["upload.png"])

    refused = cli("build", "--images", str(images), *res)
    assert refused.returncode == 2
    assert "built by model 'tiny-vit'" in refused.stderr
    assert f"python -m service.index rebuild --data-dir {data}" in refused.stderr

    # The uploaded item has no source file: refused unless dropped explicitly.
    missing = cli("rebuild", *res)
    assert missing.returncode == 2 and "'uploaded'" in missing.stderr
    assert "--skip-missing" in missing.stderr
    done = cli("rebuild", "--skip-missing", *res)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert report["re_embedded"] == 3 and report["dropped"] == ["uploaded"]
    assert Path(report["previous"]).is_dir()

    with open_for(tiny_resnet_dir, data) as store:
        assert len(store) == 3 and store.get("coffee.png").has_thumbnail
        expected = direct_embedding(tiny_resnet_dir, images / "coffee.png")
        np.testing.assert_allclose(store.vector("coffee.png"), expected, atol=1e-5)
