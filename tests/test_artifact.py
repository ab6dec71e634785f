"""The artifact contract: the one eval transform (torchvision's bytes), format versions, names
and the shared file helpers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    NAME_PATTERN,
    ArtifactError,
    Manifest,
    load_manifest,
)
from artifact.cosine import l2_normalise, row_cosines
from artifact.files import atomic_write, publish_dir, sha256_file
from artifact.transform import MAX_FULL_RESIZE_RATIO, _window_only, eval_image, eval_pixels
from service.preprocess import eval_pixels as server_pixels

ODD_SIZES = [(333, 517), (517, 333), (1, 900), (900, 1), (7, 300), (37, 37), (640, 427)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise: the hardest case for resampling (every rounding shows)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


def torchvision_eval(resize: int, crop: int, interpolation: str = "bicubic"):
    from torchvision import transforms as T

    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    return T.Compose([T.Resize(resize, interpolation=mode[interpolation]), T.CenterCrop(crop)])


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize(("resize", "crop"), [(256, 224), (37, 32)])
def test_eval_image_has_torchvision_bytes(size, resize, crop):
    img = noise(*size)
    ours = eval_image(img, resize, crop)
    theirs = torchvision_eval(resize, crop)(img)
    assert ours.size == theirs.size == (crop, crop)
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("size", [(1, 900), (900, 1), (20, 300), (333, 517)])
def test_bilinear_has_torchvision_bytes_too(size):
    img = noise(*size, seed=1)
    ours = eval_image(img, 64, 56, "bilinear")
    assert ours.tobytes() == torchvision_eval(64, 56, "bilinear")(img).tobytes()


def test_thin_strips_take_the_window_path_and_stay_exact():
    # 1 x 900 at resize 256 would be a 256 x 230,400 intermediate; only the crop is computed.
    assert _window_only(1, 900, 256) and _window_only(900, 1, 256)
    assert not _window_only(20, 20 * MAX_FULL_RESIZE_RATIO, 256)  # moderate: Pillow, whole
    assert not _window_only(2000, 40_000, 256)  # downscaled: smaller than the input anyway
    for size in ((1, 900), (900, 1), (3, 2000)):
        img = noise(*size, seed=2)
        assert eval_image(img, 256, 224).tobytes() == torchvision_eval(256, 224)(img).tobytes()


def test_eval_pixels_equal_torchvision_tensors():
    from torchvision import transforms as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = noise(333, 517, seed=3)
    full = T.Compose([torchvision_eval(256, 224), T.ToTensor(), T.Normalize(mean, std)])
    ours = eval_pixels(img, 256, 224, mean, std)
    assert ours.dtype == np.float32 and ours.shape == (3, 224, 224)
    np.testing.assert_allclose(ours, full(img).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", ODD_SIZES)
def test_server_and_exporter_preprocess_like_the_artifact(tiny_vit_dir, size):
    """The server's /embed input and the exporter's parity / int8 photos: the same array."""
    from training.parity import photo_batch

    manifest = load_manifest(tiny_vit_dir)
    t = manifest.eval_transform
    img = noise(*size, seed=4)
    want = eval_pixels(img, t.resize, t.crop, manifest.mean, manifest.std, t.interpolation)
    assert np.array_equal(server_pixels(img, manifest), want)
    photo = photo_batch(["camera"], t, manifest.mean, manifest.std)[0]
    from artifact.photos import load_photo

    assert np.array_equal(photo, server_pixels(load_photo("camera"), manifest))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at most resize"):
        eval_image(noise(10, 10), 32, 40)
    with pytest.raises(ValueError, match="interpolation"):
        eval_image(noise(10, 10), 32, 32, "lanczos")


# ---------------------------------------------------------------------- versions and schema


def _copy_with(tiny_vit_dir, tmp_path, **changes):
    model = tmp_path / "m"
    shutil.copytree(tiny_vit_dir, model)
    data = json.loads((model / MANIFEST_NAME).read_text())
    data.update(changes)
    (model / MANIFEST_NAME).write_text(json.dumps(data))
    return model


def test_new_exports_are_version_3_and_older_versions_still_read(tiny_vit_dir, tmp_path):
    assert FORMAT_VERSION == 3
    assert load_manifest(tiny_vit_dir).format_version == 3
    for version in (1, 2):
        old = _copy_with(tiny_vit_dir, tmp_path / str(version), format_version=version)
        data = json.loads((old / MANIFEST_NAME).read_text())
        del data["embedding_pooling"]  # older exports do not name it: their graphs give CLS
        (old / MANIFEST_NAME).write_text(json.dumps(data))
        manifest = load_manifest(old)  # the same files: read as they are
        assert manifest.format_version == version and manifest.embedding_pooling == "cls"


def test_newer_version_is_refused_naming_both_versions_and_the_fix(tiny_vit_dir, tmp_path):
    newer = _copy_with(tiny_vit_dir, tmp_path, format_version=4, a_new_field=1)
    with pytest.raises(ArtifactError) as info:
        load_manifest(newer)
    message = str(info.value)
    assert "format_version 4" in message and "reads format_version 1, 2, 3" in message
    assert "upgrade this server" in message and "python -m training.export" in message


def test_older_unknown_version_and_unknown_fields_are_refused(tiny_vit_dir, tmp_path):
    with pytest.raises(ArtifactError, match="format_version 0.*python -m training.export"):
        load_manifest(_copy_with(tiny_vit_dir, tmp_path / "a", format_version=0))
    with pytest.raises(ArtifactError, match="typo_field"):
        load_manifest(_copy_with(tiny_vit_dir, tmp_path / "b", typo_field=1))


def test_name_pattern_is_the_manifests_own():
    data = load_manifest_data()
    for bad in ("../x", ".hidden", "", "a" * 65, "sp ace"):
        with pytest.raises(ValidationError):
            Manifest.model_validate({**data, "name": bad})
    import re

    assert re.fullmatch(NAME_PATTERN, "vit-s16_v1.2") and not re.fullmatch(NAME_PATTERN, "../x")


def load_manifest_data() -> dict:
    return {
        "name": "m",
        "arch": "resnet50",
        "family": "resnet",
        "embed_dim": 8,
        "train_image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "eval_transform": {"resize": 37, "crop": 32},
        "outputs": ["embedding"],
        "opset": 17,
        "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 1}},
        "provenance": {
            "source": "random",
            "exported_at": "now",
            "torch_version": "x",
            "exporter": "y",
        },
        "parity": [],
    }


# ---------------------------------------------------------------------- helpers


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    with atomic_write(path) as fh:
        fh.write(b"one")
    with pytest.raises(RuntimeError), atomic_write(path) as fh:
        fh.write(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"one" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert sha256_file(path) == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"


def test_publish_dir_swaps_a_whole_folder(tmp_path):
    final, staging = tmp_path / "m", tmp_path / ".staging"
    for version in ("old", "new"):
        tmp = staging / f"m.tmp-{version}"
        tmp.mkdir(parents=True)
        (tmp / "file").write_text(version)
        publish_dir(tmp, final)
    assert (final / "file").read_text() == "new" and list(staging.iterdir()) == []


def test_row_cosines_and_normalise():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], np.float32)
    b = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0]], np.float32)
    np.testing.assert_allclose(row_cosines(a, b), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(np.linalg.norm(l2_normalise(a), axis=1), [1.0, 1.0, 0.0])
    assert row_cosines(a[None], b[None]).shape == (1, 3)  # any leading axes
