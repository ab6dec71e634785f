"""The served embedding: which vector the graph's ``embedding`` is (CLS, patch mean or both), and
a training run's k-NN measuring exactly what the server then serves (pooling and transform)."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from service_helpers import serve, settings_for
from test_trainer import digits, tiny_config

from artifact import INPUT_NAME, MODEL_FILE, load_manifest
from training.augment import IMAGENET_MEAN, IMAGENET_STD
from training.config import preset
from training.data import ArrayDataset
from training.export import export_backbone, knn_eval_sizes
from training.pooling import pooled
from training.trainer import Trainer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _export(backbone, store, name: str, pooling: str, size: int = 32):
    resize, crop = knn_eval_sizes(size)
    return export_backbone(
        backbone, name, store, arch="vit_tiny", train_image_size=size, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, eval_resize=resize, eval_crop=crop, provenance={"source": "random"},
        pooling=pooling,
    )  # fmt: skip


def _outputs(model_dir, pixels: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {INPUT_NAME: pixels}), strict=True))


def test_the_graph_gives_the_pooling_the_manifest_names(tiny_vit, tmp_path):
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 48), dtype=np.float32)
    out = {}
    for pooling in ("cls", "patch_mean", "cls+patch_mean"):
        folder = _export(tiny_vit, tmp_path, pooling.replace("+", "-"), pooling)
        manifest = load_manifest(folder)
        assert manifest.embedding_pooling == pooling and manifest.format_version == 3
        assert min(p.embedding_cosine_min for p in manifest.parity) > 0.9999
        out[pooling] = _outputs(folder, pixels)
        assert out[pooling]["embedding"].shape == (3, manifest.embedding_dim)
    cls, patches = out["cls"]["embedding"], out["cls"]["patch_tokens"]
    np.testing.assert_allclose(out["patch_mean"]["embedding"], patches.mean(axis=1), atol=1e-5)
    both = np.concatenate([cls, patches.mean(axis=1)], axis=1)
    np.testing.assert_allclose(out["cls+patch_mean"]["embedding"], both, atol=1e-5)
    assert load_manifest(tmp_path / "cls-patch_mean").embedding_dim == 2 * 192


def test_pooling_needs_patch_tokens(tiny_resnet, tmp_path):
    with pytest.raises(ValueError, match="needs patch tokens"):
        export_backbone(
            tiny_resnet, "r", tmp_path, arch="resnet18", train_image_size=32, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, eval_resize=37, eval_crop=32, provenance={"source": "random"},
            pooling="patch_mean",
        )  # fmt: skip
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="needs a ViT"):
        preset("quickstart", arch="resnet18")
    with pytest.raises(ValueError, match="must be one of"):
        preset("quickstart", embedding_pooling="max")


def test_whitening_is_capped_by_what_the_features_allow():
    from training.knn_served import fit_transform

    fitted = fit_transform(torch.randn(10, 6), whiten=50)
    assert fitted.kind == "whiten" and fitted.projection.shape == (6, 6)


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(out, format="PNG")
    return out.getvalue()


@pytest.mark.anyio
async def test_a_run_serves_the_vector_its_knn_measured(tmp_path):
    """Trainer k-NN on pooled, whitened features -> export with that transform -> the server's
    /embed gives the same unit vectors the k-NN used."""
    from training.run import export_teacher

    torch.manual_seed(0)
    images, labels = digits(300)
    train, test = ArrayDataset(images[:240], labels[:240]), ArrayDataset(images[240:], labels[240:])
    cfg = tiny_config(
        epochs=1, embedding_pooling="cls+patch_mean", embedding_whiten=24,
        models_dir=str(tmp_path / "models"), mean=(0.5,) * 3, std=(0.25,) * 3,
    )  # fmt: skip
    trainer = Trainer(cfg, train, tmp_path / "run", knn_sets=(train, test), show_progress=False)
    trainer.fit()
    knn = trainer.run_knn()
    assert knn["transform"] == "whiten" and knn["served_dim"] == 24 and "top1" in knn["raw"]
    folder = export_teacher(trainer, cfg, knn, "digits-run")
    manifest = load_manifest(folder)
    assert manifest.embedding_transform.output_dim == 24 and manifest.embedding_dim == 2 * 192
    assert manifest.knn["top1"] == knn["top1"]

    # What the k-NN compared for the first test images, in PyTorch ...
    fitted = trainer.embedding_fit
    stored = np.load(folder / "embedding_transform.npz")
    np.testing.assert_array_equal(fitted.projection, stored["projection"])
    eval_set = trainer.knn_sets[1]
    with torch.no_grad():
        model = pooled(trainer.teacher.backbone, "cls+patch_mean").eval()
        want = fitted.apply(model(torch.stack([eval_set[i][0] for i in range(4)]))).numpy()
    # ... and what the server answers for the same images.
    async with serve(settings_for(folder, tmp_path / "data")) as client:
        files = [("images", (f"{i}.png", _png(images[240 + i]), "image/png")) for i in range(4)]
        served = (await client.post("/embed", files=files)).json()
        models = (await client.get("/models")).json()
    assert served["dim"] == 24 and models["served_dim"] == 24
    assert models["embedding_pooling"] == "cls+patch_mean"
    np.testing.assert_allclose(np.array(served["embeddings"]), want, atol=2e-4)
