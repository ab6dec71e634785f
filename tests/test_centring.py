"""The artifact's embedding transform: fitted on the exported graph, checked by sha256, applied by
the server before L2 normalisation, recorded by the index (which refuses other vectors)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from service_helpers import encode, photo, serve, settings_for

from artifact import ArtifactError, load_manifest
from service.index import IndexModelMismatch, IndexStore
from training.centring import TRANSFORM_FILE, add_transform, fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page")


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name, 96)))
    return folder


@pytest.fixture
def model_copy(tiny_vit_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny ViT (same weights, same sha256) to add a transform to."""
    return Path(shutil.copytree(tiny_vit_dir, tmp_path / "store" / "tiny-vit"))


def _files(folder: Path) -> dict[str, tuple[str, bytes, str]]:
    return {
        f"f{i}": (p.name, p.read_bytes(), "image/jpeg")
        for i, p in enumerate(sorted(folder.iterdir()))
    }


def test_fit_whitening_decorrelates() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 5.0
    mean, projection = fit(x, whiten=4)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5)
    white = (x - mean) @ projection
    np.testing.assert_allclose(np.cov(white.T), np.eye(4), atol=1e-3)
    assert fit(x)[1] is None
    with pytest.raises(ValueError, match="--whiten must be within"):
        fit(x, whiten=7)


@pytest.mark.anyio
async def test_server_centres_and_can_return_raw(model_copy, photo_dir, tmp_path) -> None:
    info = add_transform(model_copy, str(photo_dir))
    manifest = load_manifest(model_copy)
    assert manifest.embedding_transform == info
    assert (info.kind, info.images, info.input_dim, info.output_dim) == ("centre", 8, 192, 192)
    mean = np.load(model_copy / TRANSFORM_FILE)["mean"]
    async with serve(settings_for(model_copy, tmp_path / "data")) as client:
        files = [("images", (n, b, t)) for n, b, t in _files(photo_dir).values()]
        raw = await client.post("/embed", files=files, data={"raw": "true", "normalize": "false"})
        served = await client.post("/embed", files=files)
        models = (await client.get("/models")).json()
    assert raw.status_code == served.status_code == 200
    raw_rows = np.array(raw.json()["embeddings"])
    # The fitted mean is the mean of what the server computes (same graph, same eval transform).
    np.testing.assert_allclose(raw_rows.mean(axis=0), mean, atol=1e-4)
    want = raw_rows - mean
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(served.json()["embeddings"]), want, atol=1e-5)
    assert served.json()["transform"].startswith("centre:") and raw.json()["transform"] == "none"
    assert models["applied_transform"]["kind"] == "centre"
    assert models["embedding_transform"]["sha256"] == info.sha256
    # Centring spreads the scores: the photos are no longer all near 1 to each other.
    cos = want @ want.T
    assert cos[~np.eye(len(cos), dtype=bool)].mean() < 0.5


@pytest.mark.anyio
async def test_whitened_vectors_have_the_chosen_dimension(model_copy, photo_dir, tmp_path) -> None:
    add_transform(model_copy, str(photo_dir), whiten=5)
    async with serve(settings_for(model_copy, tmp_path / "data")) as client:
        one = {"images": ("a.jpg", encode(photo("chelsea", 64)), "image/jpeg")}
        emb = (await client.post("/embed", files=one)).json()
        added = await client.post("/items", files={"images": one["images"]})
        stats = (await client.get("/index")).json()
    assert emb["dim"] == 5 and abs(np.linalg.norm(emb["embeddings"][0]) - 1) < 1e-5
    assert added.status_code == 201 and stats["dim"] == 5
    assert stats["embedding_transform"].startswith("whiten:")


def test_tampered_transform_is_refused(model_copy, photo_dir) -> None:
    from service.embedding_transform import load_transform

    add_transform(model_copy, str(photo_dir))
    np.savez(model_copy / TRANSFORM_FILE, mean=np.zeros(192, np.float32))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load_transform(model_copy, load_manifest(model_copy))


def test_index_refuses_vectors_made_without_the_transform(model_copy, photo_dir, tmp_path) -> None:
    data = tmp_path / "data"
    sha = load_manifest(model_copy).model_sha256
    with IndexStore.open(data, sha, 192, progress=False) as store:
        store.add(np.eye(192, dtype=np.float32)[:2], ids=["a", "b"])
    info = add_transform(model_copy, str(photo_dir))
    with pytest.raises(IndexModelMismatch, match="rebuild"):
        IndexStore.open(data, sha, 192, transform=f"centre:{info.sha256}", progress=False)


def test_rebuild_re_embeds_with_the_transform(model_copy, photo_dir, tmp_path) -> None:
    """An index built by the CLI before centring: the server refuses it, `rebuild` fixes it."""
    data = tmp_path / "data"
    store_args = ["--models-dir", str(model_copy.parent), "--model", "tiny-vit"]
    env_args = [*store_args, "--data-dir", str(data), "--no-progress"]
    cli = [sys.executable, "-m", "service.index"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DINO_ENGINE": "onnxruntime"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True)

    assert run("build", "--images", str(photo_dir), *env_args).returncode == 0
    add_transform(model_copy, str(photo_dir))
    refused = run("build", "--images", str(photo_dir), *env_args)
    assert refused.returncode == 2 and "embedding transform" in refused.stderr
    rebuilt = run("rebuild", *env_args)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["re_embedded"] == len(PHOTOS)
    info = json.loads(run("stats", "--data-dir", str(data)).stdout)
    assert info["embedding_transform"].startswith("centre:") and info["count"] == len(PHOTOS)


def test_centring_cli_and_export_flags(model_copy, photo_dir) -> None:
    from training.centring import main

    assert main(["--model", str(model_copy), "--images", str(photo_dir / "missing")]) == 1
    assert load_manifest(model_copy).embedding_transform is None  # unchanged on failure
    assert main(["--model", str(model_copy), "--images", "training"]) == 1  # random: no config
    assert main(["--model", str(model_copy), "--images", str(photo_dir), "--whiten", "3"]) == 0
    assert load_manifest(model_copy).embedding_transform.output_dim == 3


def test_export_flags_fit_the_transform(photo_dir, tmp_path) -> None:
    from training.export import main as export_main

    store = tmp_path / "exported"
    base = ["--random-init", "--arch", "vit_tiny", "--patch-size", "8", "--depth", "1"]
    base += ["--image-size", "32", "--models-dir", str(store)]
    # Bad usage or input: exit 2 with one message, nothing exported.
    assert export_main([*base, "--name", "w", "--whiten", "3"]) == 2  # --whiten needs --centre-on
    assert export_main([*base, "--name", "gone", "--centre-on", str(tmp_path / "none")]) == 2
    assert not (store / "gone").exists()  # refused before any work
    assert export_main([*base, "--name", "c", "--centre-on", str(photo_dir), "--whiten", "3"]) == 0
    info = load_manifest(store / "c").embedding_transform
    assert (info.kind, info.output_dim, info.images) == ("whiten", 3, len(PHOTOS))


@pytest.mark.anyio
async def test_server_refuses_an_index_made_without_the_transform(model_copy, photo_dir, tmp_path):
    data = tmp_path / "data"
    async with serve(settings_for(model_copy, data)) as client:
        one = {"images": ("a.jpg", encode(photo("coffee", 64)), "image/jpeg")}
        assert (await client.post("/items", files=one)).status_code == 201
    add_transform(model_copy, str(photo_dir))
    with pytest.raises(IndexModelMismatch, match="embedding transform 'none'.*rebuild"):
        async with serve(settings_for(model_copy, data)):
            pass


def test_int8_variants_are_gated_again_on_the_served_vectors(model_copy, photo_dir) -> None:
    """Whitening weighs int8's rounding noise on weak axes like signal: the export's raw-vector
    gate no longer speaks for what is served, so adding a transform measures it again."""
    from artifact import INT8_FILE
    from training.regate import regate

    before = load_manifest(model_copy).variants["int8"]
    add_transform(model_copy, str(photo_dir), whiten=5)
    manifest = load_manifest(model_copy, verify_files=True)
    if "int8" in manifest.variants:  # re-measured through the whitening, not copied over
        after = manifest.variants["int8"]
        assert after.embedding_cosine_min >= 0.99
        assert after.embedding_cosine_min != before.embedding_cosine_min
    else:  # dropped: gone from the manifest and the folder alike
        assert INT8_FILE not in manifest.files and not (model_copy / INT8_FILE).exists()
    # A served vector that turns int8's tiny differences into large ones fails the gate.
    kept, dropped = regate(model_copy, manifest, lambda x: np.sin(x * 1e6))
    assert kept == {} and dropped == [v.file for v in manifest.variants.values()]
    kept, dropped = regate(model_copy, manifest, lambda x: x)
    assert set(kept) == set(manifest.variants) and dropped == []
