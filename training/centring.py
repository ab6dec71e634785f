"""Fit the embedding transform an artifact carries: the mean CLS embedding over reference images
and, optionally, a PCA whitening projection to a chosen dimension (as DINO's copy-detection
evaluation does). The server subtracts the mean (and projects) before L2 normalisation, so scores
spread out: unrelated images near 0, copies near 1.

    python -m training.centring --model models/quickstart --images training [--whiten 128]
    python -m training.centring --model models/my-model --images photos/ --limit 5000

The embeddings come from the exported ``model.onnx`` in onnxruntime, through the manifest's eval
transform, so the statistics describe exactly what the server computes. Adding a transform changes
the served vectors: an index built without it is refused until rebuilt
(``python -m service.index rebuild``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

from artifact import (
    INPUT_NAME,
    MODEL_FILE,
    EmbeddingTransformInfo,
    Manifest,
    load_manifest,
    sha256_file,
    transform,
    write_manifest,
)
from training.regate import regate

log = logging.getLogger("training.centring")

# The artifact file the server reads (the serving side names the same file).
TRANSFORM_FILE = "embedding_transform.npz"
DEFAULT_LIMIT = 10_000
BATCH = 256


def reference_images(source: str, config: dict | None, limit: int, seed: int = 0):
    """(load(i) -> RGB image, count, description) for up to ``limit`` images of ``source``:
    ``training`` (the dataset the model was trained on, from its recorded config) or a folder."""
    from training.data import ImageFolderDataset, load_splits

    if source == "training":
        if not config or "dataset" not in config:
            raise ValueError(
                "this artifact records no training config: pass --images DIR with images like "
                "the ones you will serve"
            )
        dataset = load_splits(config["dataset"], config.get("data"), config.get("fmnist_dir")).train
        what = f"training images ({config['dataset']})"
    else:
        if not Path(source).is_dir():
            raise ValueError(f"--images {source} is not a folder (or the word 'training')")
        dataset = ImageFolderDataset(source)
        what = f"folder {Path(source).name}"
    if len(dataset) == 0:
        raise ValueError(f"no images found in {what}")
    picks = np.random.default_rng(seed).permutation(len(dataset))[:limit]
    if source == "training":
        return (lambda i: dataset[int(picks[i])][0]), len(picks), what
    return (lambda i: _open(dataset.files[int(picks[i])])), len(picks), what


def _open(path: Path) -> Image.Image:
    """As the server decodes an upload: first frame, EXIF orientation applied, RGB."""
    with Image.open(path) as img:
        img.seek(0)
        return ImageOps.exif_transpose(img).convert("RGB")


def eval_pixels(img: Image.Image, manifest: Manifest) -> np.ndarray:
    """The server's eval transform (the artifact's one), so the fitted mean is the mean of what
    the server computes. float32 ``[3, crop, crop]``."""
    t = manifest.eval_transform
    return transform.eval_pixels(
        img, t.resize, t.crop, manifest.mean, manifest.std, t.interpolation
    )


def embed(
    model_dir: Path, load: Callable[[int], Image.Image], count: int, threads: int = 0
) -> np.ndarray:
    """Raw CLS embeddings [count, dim] of ``load(0..count-1)`` from the exported fp32 graph."""
    manifest = load_manifest(model_dir, verify_files=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"]
    )
    out = []
    for start in range(0, count, BATCH):
        pixels = np.stack(
            [eval_pixels(load(i), manifest) for i in range(start, min(start + BATCH, count))]
        )
        out.append(session.run(["embedding"], {INPUT_NAME: pixels})[0])
    return np.concatenate(out).astype(np.float32)


def fit(embeddings: np.ndarray, whiten: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The mean, and for ``whiten`` a [dim, whiten] projection onto the top principal axes,
    each scaled to unit variance (a small floor keeps near-empty axes from blowing up noise)."""
    x = np.asarray(embeddings, np.float64)
    n, dim = x.shape
    if n < 2:
        raise ValueError("centring needs at least 2 images")
    mean = x.mean(axis=0)
    if whiten is None:
        return mean.astype(np.float32), None
    if not 0 < whiten <= min(dim, n - 1):
        raise ValueError(f"--whiten must be within 1..{min(dim, n - 1)} (dim {dim}, {n} images)")
    centred = x - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / (n - 1))
    order = np.argsort(values)[::-1][:whiten]
    floor = max(values.max(), 1e-12) * 1e-4
    projection = vectors[:, order] / np.sqrt(np.maximum(values[order], floor))
    return mean.astype(np.float32), projection.astype(np.float32)


def write_transform(
    model_dir: Path, mean: np.ndarray, projection: np.ndarray | None, images: int, fitted_on: str
) -> EmbeddingTransformInfo:
    """Write the npz and record it in the manifest; each file is replaced by a rename, so a
    reader sees the old or the new one (the manifest last: it names the new file's sha256)."""
    manifest = load_manifest(model_dir, verify_files=True)
    arrays = {"mean": mean} if projection is None else {"mean": mean, "projection": projection}
    fd, tmp = tempfile.mkstemp(prefix=".transform-", suffix=".npz", dir=model_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, model_dir / TRANSFORM_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    info = EmbeddingTransformInfo(
        kind="centre" if projection is None else "whiten",
        file=TRANSFORM_FILE,
        sha256=sha256_file(model_dir / TRANSFORM_FILE),
        input_dim=len(mean),
        output_dim=len(mean) if projection is None else projection.shape[1],
        images=images,
        fitted_on=fitted_on,
    )
    # int8 variants must pass their gate on the served (transformed) vectors too.
    variants, dropped = regate(model_dir, manifest, lambda x: _served(x, mean, projection))
    files = {k: v for k, v in manifest.files.items() if k not in dropped}
    update = {"embedding_transform": info, "variants": variants, "files": files}
    staged = Path(tempfile.mkdtemp(prefix=".manifest-", dir=model_dir))
    try:
        written = write_manifest(manifest.model_copy(update=update), staged)
        os.replace(written, model_dir / written.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    for name in dropped:  # no longer named by the manifest a reader sees
        (model_dir / name).unlink(missing_ok=True)
    load_manifest(model_dir, verify_files=True)  # the reader's own check
    return info


def _served(x: np.ndarray, mean: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    x = x - mean
    return x if projection is None else x @ projection


def add_transform(
    model_dir: Path | str,
    source: str,
    whiten: int | None = None,
    limit: int = DEFAULT_LIMIT,
    threads: int = 0,
) -> EmbeddingTransformInfo:
    """Fit the transform for the artifact in ``model_dir`` on ``source`` and store it there."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir, verify_files=True)
    config = manifest.provenance.training_config
    load, count, what = reference_images(source, config, limit)
    log.info("centring %s on %d %s", manifest.name, count, what)
    mean, projection = fit(embed(model_dir, load, count, threads), whiten)
    info = write_transform(model_dir, mean, projection, count, what)
    log.info("wrote %s (%s, %d -> %d dims)", info.file, info.kind, info.input_dim, info.output_dim)
    return info


def check_source(source: str) -> None:
    """Fail before an export starts when the centring images cannot be found."""
    if source != "training" and not Path(source).is_dir():
        raise ValueError(f"--centre-on {source} is not a folder (or the word 'training')")


def centre_exported(model_dir: Path, args: argparse.Namespace) -> bool:
    """After ``training.export`` published the artifact: fit its transform; on failure the
    artifact stays as exported (uncentred) and the log says how to add the transform later."""
    try:
        add_transform(model_dir, args.centre_on, args.whiten, args.centre_limit)
    except (ValueError, OSError) as exc:
        log.error(
            "exported %s, but fitting its embedding transform failed (%s); add it later with "
            "`python -m training.centring --model %s --images DIR|training`",
            model_dir,
            exc,
            model_dir,
        )
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser, flag: str = "--images") -> None:
    """The centring flags, shared with ``training.export``."""
    parser.add_argument(
        flag,
        metavar="DIR|training",
        help="fit the mean embedding (the server centres with it) on this folder of images, or "
        "on the model's own training images with 'training'",
    )
    parser.add_argument(
        "--whiten",
        type=int,
        metavar="DIM",
        help="also fit a PCA whitening projection to DIM dimensions (served vectors get DIM)",
    )
    parser.add_argument(
        "--centre-limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"at most this many reference images, sampled at random (default {DEFAULT_LIMIT})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.centring", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, required=True, help="the artifact folder")
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.images:
        parser.error("--images DIR|training is required")
    try:
        info = add_transform(args.model, args.images, args.whiten, args.centre_limit, args.threads)
    except (ValueError, OSError) as exc:
        log.error("centring failed, artifact unchanged: %s", exc)
        return 1
    print(info.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
