"""Export to ONNX: artifacts load and run without torch, match PyTorch at any shape, and failed
exports leave nothing behind."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from artifact import INT8_FILE, MANIFEST_NAME, MODEL_FILE, load_manifest, sha256_file
from training.augment import IMAGENET_MEAN, IMAGENET_STD
from training.backbones import build_backbone
from training.export import export_backbone, knn_eval_sizes, main
from training.parity import ParityError
from training.vision_transformer import VisionTransformer

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter where `import torch` raises: what the server can rely on.
TORCH_FREE_RUNNER = r"""
import sys
sys.modules["torch"] = None
import json
from pathlib import Path
import numpy as np
import onnxruntime as ort
from artifact import INPUT_NAME, MODEL_FILE, load_manifest
for job in json.loads(sys.argv[1]):
    model_dir = Path(job["model_dir"])
    manifest = load_manifest(model_dir)
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert tuple(o.name for o in session.get_outputs()) == manifest.outputs
    inputs, outputs = np.load(job["inputs"]), {}
    for key in inputs.files:
        for name, value in zip(manifest.outputs, session.run(None, {INPUT_NAME: inputs[key]})):
            outputs[f"{key}/{name}"] = value
    np.savez(job["outputs"], **outputs)
loaded = sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None)
assert not loaded, loaded
print("torch-free ok")
"""


def _export(backbone, name: str, models_dir: Path, size: int, **kw) -> Path:
    resize, crop = knn_eval_sizes(size)
    return export_backbone(
        backbone,
        name,
        models_dir,
        arch=kw.pop("arch", "vit_tiny"),
        train_image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_resize=resize,
        eval_crop=crop,
        provenance=kw.pop("provenance", {"source": "random"}),
        **kw,
    )


def _tree(models_dir: Path) -> dict[str, str]:
    """Every file under ``models_dir`` (hidden ones included) with its sha256."""
    return {
        str(p.relative_to(models_dir)): sha256_file(p)
        for p in sorted(models_dir.rglob("*"))
        if p.is_file()
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _torch_outputs(backbone, x: np.ndarray) -> list[np.ndarray]:
    """The artifact's outputs as PyTorch computes them, independently of the export's graph:
    a ViT's layer_tokens from DINO's get_intermediate_layers (last 2 of the tiny ViT's 2 blocks)."""
    with torch.no_grad():
        t = torch.from_numpy(x)
        if backbone.family != "vit":
            return [backbone(t).numpy()]
        out = list(backbone.forward_features(t))
        seqs = backbone.get_intermediate_layers(t, n=min(4, len(backbone.blocks)))
        out.append(torch.stack([s[:, 1:] for s in seqs], dim=1))
    return [o.numpy() for o in out]


def test_knn_eval_sizes_scale_dino_protocol():
    assert knn_eval_sizes(224) == (256, 224)
    assert knn_eval_sizes(28) == (32, 28)
    assert knn_eval_sizes(32) == (37, 32)


def test_vit_manifest_records_contract_and_parity(tiny_vit_dir):
    manifest = load_manifest(tiny_vit_dir, verify_files=True)
    assert manifest.name == "tiny-vit" and manifest.family == "vit"
    assert (manifest.patch_size, manifest.embed_dim, manifest.num_heads) == (8, 192, 3)
    assert manifest.outputs == ("embedding", "patch_tokens", "attention", "layer_tokens")
    assert manifest.token_layers == (0, 1) and manifest.has_layer_tokens  # depth 2: both blocks
    assert (manifest.eval_transform.resize, manifest.eval_transform.crop) == (37, 32)
    assert manifest.opset == 17 and "dynamo=False" in manifest.provenance.exporter
    assert manifest.provenance.source == "random" and manifest.provenance.torch_version
    shapes = [p.shape for p in manifest.parity]
    assert shapes == [(1, 3, 32, 32), (1, 3, 32, 48), (2, 3, 32, 32)]
    for check in manifest.parity:
        assert check.embedding_cosine_min >= 0.9999
        assert check.embedding_max_abs_diff < 1e-4
        assert check.attention_max_abs_diff is not None and check.attention_max_abs_diff < 1e-5
        assert check.layer_tokens_max_abs_diff is not None
        assert check.layer_tokens_max_abs_diff < 1e-4
    # One self-contained file per model (no external-data side files), no temp folders left.
    assert {p.name for p in tiny_vit_dir.iterdir()} == {MANIFEST_NAME, MODEL_FILE, INT8_FILE}
    assert [p.name for p in tiny_vit_dir.parent.iterdir()] == ["tiny-vit"]


def test_int8_variant_recorded_with_its_cosine(tiny_vit_dir):
    manifest = load_manifest(tiny_vit_dir)
    variant = manifest.variants["int8"]
    assert variant.file == INT8_FILE and variant.precision == "int8"
    assert 0.99 <= variant.embedding_cosine_min <= variant.embedding_cosine_mean <= 1.0
    assert manifest.files[INT8_FILE].sha256 != manifest.model_sha256


def test_resnet_manifest_has_embedding_only(tiny_resnet_dir):
    manifest = load_manifest(tiny_resnet_dir)
    assert manifest.family == "resnet" and manifest.outputs == ("embedding",)
    assert manifest.embed_dim == 512 and manifest.patch_size is None
    assert not manifest.has_attention and manifest.variants == {}
    assert manifest.token_layers is None and not manifest.has_layer_tokens
    assert all(p.attention_max_abs_diff is None for p in manifest.parity)
    assert all(p.layer_tokens_max_abs_diff is None for p in manifest.parity)
    assert min(p.embedding_cosine_min for p in manifest.parity) >= 0.9999


def test_onnx_runs_without_torch_and_matches_pytorch_at_any_shape(
    tiny_vit, tiny_vit_dir, tiny_resnet, tiny_resnet_dir, tmp_path
):
    rng = np.random.default_rng(1)
    shapes = {
        "vit": [(1, 3, 32, 32), (2, 3, 24, 40), (3, 3, 64, 48), (1, 3, 8, 8)],
        "resnet": [(1, 3, 64, 64), (2, 3, 48, 96)],
    }
    models = {"vit": (tiny_vit, tiny_vit_dir), "resnet": (tiny_resnet, tiny_resnet_dir)}
    jobs = []
    for key, (_, model_dir) in models.items():
        inputs = {
            f"s{i}": rng.standard_normal(s, dtype=np.float32) for i, s in enumerate(shapes[key])
        }
        np.savez(tmp_path / f"{key}_in.npz", **inputs)
        jobs.append(
            {
                "model_dir": str(model_dir),
                "inputs": str(tmp_path / f"{key}_in.npz"),
                "outputs": str(tmp_path / f"{key}_out.npz"),
            }
        )
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_RUNNER, json.dumps(jobs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch-free ok" in proc.stdout

    for key, (backbone, model_dir) in models.items():
        names = load_manifest(model_dir).outputs
        inputs, got = np.load(tmp_path / f"{key}_in.npz"), np.load(tmp_path / f"{key}_out.npz")
        for k in inputs.files:
            x = inputs[k]
            expected = _torch_outputs(backbone, x)
            for name, ref in zip(names, expected, strict=True):
                out = got[f"{k}/{name}"]
                assert out.shape == ref.shape, (key, x.shape, name)
                assert np.abs(out - ref).max() < 1e-4, (key, x.shape, name)
            assert _cosines(got[f"{k}/embedding"], expected[0]).min() > 0.99999
        if key == "vit":
            h, w = 64 // 8, 48 // 8
            assert got["s2/attention"].shape == (3, 3, h * w)
            assert got["s2/patch_tokens"].shape == (3, h * w, 192)
            assert got["s2/layer_tokens"].shape == (3, 2, h * w, 192)


def test_int8_below_threshold_is_skipped_with_its_figure(tiny_vit, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="training")
    # No int8 graph reaches cosine 1.01: the rule must drop the variant, not the export.
    model_dir = _export(tiny_vit, "m", tmp_path, 32, int8=True, int8_min_cosine=1.01)
    manifest = load_manifest(model_dir)
    assert manifest.variants == {} and INT8_FILE not in manifest.files
    assert not (model_dir / INT8_FILE).exists()
    skipped = [r.getMessage() for r in caplog.records if "int8 SKIPPED" in r.getMessage()]
    assert len(skipped) == 1 and "min embedding cosine vs fp32 0.99" in skipped[0]


class _DivergentViT(VisionTransformer):
    """Computes something else in eager mode than what gets traced: the export bug that parity
    exists to catch (e.g. a size baked into the graph)."""

    def forward_features(self, x):
        cls, patches, attn = super().forward_features(x)
        if not torch.onnx.is_in_onnx_export():
            cls = cls.flip(-1)
        return cls, patches, attn


def test_parity_failure_writes_nothing_and_keeps_existing(tmp_path):
    store = tmp_path / "models"
    existing = _export(build_backbone("vit_tiny", 8, depth=2, img_size=32), "m", store, 32)
    before = _tree(store)
    torch.manual_seed(0)
    bad = _DivergentViT(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3)
    with pytest.raises(ParityError, match="embedding cosine"):
        _export(bad, "m", store, 32)
    assert _tree(store) == before and existing.is_dir()
    with pytest.raises(ParityError):
        _export(bad, "new", store, 32)
    assert not (store / "new").exists() and _tree(store) == before


def test_reexport_replaces_atomically(tmp_path):
    first = build_backbone("vit_tiny", 8, depth=2, img_size=32)
    second = build_backbone("vit_tiny", 8, depth=2, img_size=32)
    a = load_manifest(_export(first, "m", tmp_path, 32)).model_sha256
    stale = tmp_path / ".staging" / "m.tmp-killed"  # left by an export killed a day ago
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    model_dir = _export(second, "m", tmp_path, 32, knn={"top1": 12.5})
    manifest = load_manifest(model_dir, verify_files=True)
    assert manifest.model_sha256 != a and manifest.knn == {"top1": 12.5}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old folder left
    assert oct(model_dir.stat().st_mode & 0o777) == oct(0o755)


def test_bad_name_is_refused_before_any_work(tiny_vit, tmp_path):
    with pytest.raises(ValueError, match="model name"):
        _export(tiny_vit, "../escape", tmp_path / "models", 32)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def _official_checkpoint(backbone, path: Path) -> None:
    """A checkpoint laid out like DINO's published training checkpoints."""
    sd = backbone.state_dict()
    head = {"head.mlp.0.weight": torch.randn(16, 192), "head.last_layer.weight_g": torch.ones(8, 1)}
    torch.save(
        {
            "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},
            "student": {f"module.backbone.{k}": v + 1.0 for k, v in sd.items()}
            | {f"module.{k}": v for k, v in head.items()},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=8),
        },
        path,
    )


@pytest.mark.slow  # a fresh interpreter importing torch: ~15 s on a loaded 2-core machine
def test_official_format_checkpoint_exports_via_cli(tmp_path):
    torch.manual_seed(3)
    teacher = build_backbone("vit_tiny", 8, img_size=32).eval()
    ckpt = tmp_path / "checkpoint.pth"
    _official_checkpoint(teacher, ckpt)
    store = tmp_path / "models"
    proc = subprocess.run(
        [sys.executable, "-m", "training.export", "--checkpoint", str(ckpt), "--arch", "vit_tiny"]
        + ["--patch-size", "8", "--name", "official", "--models-dir", str(store)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phase in ("export:", "parity:", "write:"):
        assert phase in proc.stderr
    manifest = load_manifest(store / "official")
    assert manifest.train_image_size == 32  # read from the checkpoint's positional embedding
    assert manifest.provenance.source == "checkpoint"
    assert manifest.provenance.checkpoint_sha256 == sha256_file(ckpt)
    assert manifest.provenance.training_config["arch"] == "vit_tiny"
    # The weights are the teacher's (the student's differ by +1 everywhere).
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 40), dtype=np.float32)
    session = ort.InferenceSession(str(store / "official" / MODEL_FILE))
    got = session.run(["embedding"], {"pixel_values": x})[0]
    assert _cosines(got, _torch_outputs(teacher, x)[0]).min() > 0.99999


def test_corrupt_checkpoint_fails_clearly_and_leaves_existing(tmp_path, capsys):
    store = tmp_path / "models"
    _export(build_backbone("vit_tiny", 8, depth=2, img_size=32), "target", store, 32)
    before = _tree(store)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 10)
    argv = ["--checkpoint", str(bad), "--arch", "vit_tiny", "--patch-size", "8"]
    assert main([*argv, "--name", "target", "--models-dir", str(store)]) == 2  # bad input
    assert "corrupt or truncated" in capsys.readouterr().err
    assert _tree(store) == before


def test_mismatched_checkpoint_names_both_archs_and_writes_nothing(tmp_path, capsys):
    ckpt = tmp_path / "vit_tiny.pth"
    torch.save(build_backbone("vit_tiny", 8, img_size=32).state_dict(), ckpt)
    store = tmp_path / "models"
    argv = ["--checkpoint", str(ckpt), "--arch", "vit_small", "--patch-size", "8"]
    assert main([*argv, "--name", "wrong", "--models-dir", str(store)]) == 2
    message = capsys.readouterr().err
    assert "does not fit" in message and "--arch vit_tiny" in message
    assert not store.exists() or _tree(store) == {}


def test_cli_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path):
    base = [sys.executable, "-m", "training.export", "--models-dir", str(tmp_path / "models")]
    cases = {
        "not allowed": [
            "--random-init",
            "--arch",
            "vit_tiny",
            "--image-size",
            "32",
            "--name",
            "a b",
        ],
        "missing.pth": ["--checkpoint", str(tmp_path / "missing.pth"), "--name", "x"],
    }
    for expected, args in cases.items():
        proc = subprocess.run([*base, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "a b").exists()
