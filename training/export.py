"""Export a backbone to a servable artifact: ``models/<name>/`` holding ``model.onnx``,
``manifest.json`` and optionally ``model.int8.onnx``.

    python -m training.export --checkpoint dino_deitsmall16_pretrain.pth --arch vit_small \\
        --patch-size 16 --name dino-vits16 [--int8]

Everything is written to a hidden temp folder inside the model store, checked (ORT vs PyTorch
parity, manifest validation with sha256), and only then swapped in by renames, so readers see the
old complete artifact or the new complete one, never a half-written folder; any failure leaves
nothing behind and an existing artifact of that name untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from artifact import (
    INT8_FILE,
    MODEL_FILE,
    NAME_PATTERN,
    EvalTransform,
    FileEntry,
    Manifest,
    Provenance,
    Variant,
    load_manifest,
    sha256_file,
    write_manifest,
)
from artifact.cli import run_cli
from artifact.files import STAGING_DIR, publish_dir, remove_stale
from artifact.photos import load_photo
from artifact.transform import eval_pixels
from training.centring import centre_exported
from training.centring import check_source as check_centring_source
from training.eval_settings import (
    DEFAULT_PATCH_SIZE,
    IMAGENET_IMAGE_SIZE,
    checkpoint_eval_settings,
    checkpoint_meta,
    inferred_image_size,
    knn_eval_sizes,
)
from training.export_args import parse_args as _parse
from training.onnx_graph import (
    EXPORTER,
    OPSET,
    export_onnx,
    inference_copy,
    output_names,
    token_layers,
)
from training.parity import check_parity, far_parity_inputs, parity_inputs
from training.pooling import check_pooling
from training.provenance import git_commit
from training.quantize import MIN_INT8_COSINE, int8_variant
from training.quantize_openvino import BIN_FILE, CALIBRATION_IMAGES, XML_FILE

# OpenVINO static int8 IR files (--int8-openvino).
OPENVINO_INT8_FILES = (XML_FILE, BIN_FILE)

# Named explicitly: run as ``python -m`` this module is ``__main__``.
log = logging.getLogger("training.export")

__all__ = ["export_backbone", "git_commit", "knn_eval_sizes", "main"]


def export_backbone(
    backbone: nn.Module,
    name: str,
    models_dir: str | Path,
    *,
    arch: str,
    train_image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    eval_resize: int,
    eval_crop: int,
    provenance: dict,
    knn: dict | None = None,
    int8: bool = False,
    int8_min_cosine: float = MIN_INT8_COSINE,
    int8_openvino: bool = False,
    int8_labels: Sequence[str] = (),
    int8_calibration: int = CALIBRATION_IMAGES,
    pooling: str = "cls",
) -> Path:
    """Export ``backbone`` to ``models_dir/name`` and return that folder.

    ``provenance``: ``source`` and optionally ``checkpoint_sha256``, ``git_commit``,
    ``training_config`` (export time, torch version and exporter are added). ``ParityError``
    (nothing written) when onnxruntime and PyTorch disagree. ``int8`` / ``int8_openvino`` add
    int8 variants, each kept only when it passes its gate (``int8_min_cosine`` on the bundled
    photos; ``int8_labels`` names labelled sets for their k-NN gate; ``int8_calibration`` is how
    many images calibrate OpenVINO's static int8). ``pooling``: which vector the ``embedding``
    output is (``training.pooling``).
    """
    patch = _check_request(backbone, name, train_image_size, eval_crop)
    check_pooling(pooling, backbone.family)
    # Validate the cheap parts first so a bad call fails before any work.
    prov = Provenance(
        **provenance, exported_at=_now(), torch_version=torch.__version__, exporter=EXPORTER
    )
    transform = EvalTransform(resize=eval_resize, crop=eval_crop)
    models_dir = Path(models_dir)
    model = inference_copy(backbone)
    with _staging_folder(models_dir, name) as tmp:
        photo = (round(train_image_size * eval_resize / eval_crop), mean, std)
        what = f"{arch}/{patch}" if patch else arch
        parity = _write_checked_onnx(model, tmp / MODEL_FILE, what, train_image_size, photo,
                                     pooling)  # fmt: skip
        int8_kinds = (int8, int8_openvino, int8_labels, int8_calibration)
        variants = _int8_variants(tmp, backbone, transform, mean, std, int8_min_cosine, int8_kinds)
        t0 = time.perf_counter()
        manifest = Manifest(
            name=name, arch=arch, **_network_fields(backbone, patch), embedding_pooling=pooling,
            train_image_size=train_image_size, mean=tuple(mean), std=tuple(std),
            eval_transform=transform, opset=OPSET, files=_file_entries(tmp), variants=variants,
            provenance=prov, knn=knn, parity=parity,
        )  # fmt: skip
        return _publish(manifest, tmp, models_dir / name, t0)


def _publish(manifest: Manifest, staged: Path, final: Path, t0: float) -> Path:
    """Write the manifest, read it back as a server would (sha256 of every file), then swap the
    staged folder in."""
    write_manifest(manifest, staged)
    load_manifest(staged, verify_files=True)  # the reader's own check, before anyone sees it
    publish_dir(staged, final)
    log.info(
        "write: %s (%d files) in %.1f s", final, len(manifest.files) + 1, time.perf_counter() - t0
    )
    return final


def _int8_variants(
    folder: Path,
    backbone: nn.Module,
    transform: EvalTransform,
    mean: Sequence[float],
    std: Sequence[float],
    min_cosine: float,
    kinds: tuple[bool, bool, Sequence[str], int],
) -> dict[str, Variant]:
    """The int8 variants asked for, each kept only when it passes its accuracy gate:
    onnxruntime's dynamic int8 and OpenVINO's static int8 (k-NN gate on ``labels`` if named,
    calibrated on ``calibration`` images)."""
    dynamic, openvino, labels, calibration = kinds
    variants = int8_variant(folder, transform, mean, std, min_cosine, labels) if dynamic else {}
    if openvino:
        from training.quantize_openvino import openvino_int8_variant

        vit = backbone.family == "vit"
        variants |= openvino_int8_variant(
            folder, transform, mean, std, vit, labels, calibration, min_cosine
        )
    return variants


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _network_fields(backbone: nn.Module, patch: int | None) -> dict[str, Any]:
    """What the manifest says about the network's shape and outputs."""
    vit = backbone.family == "vit"
    return {
        "family": backbone.family,
        "lineage": getattr(backbone, "lineage", "dino"),
        "n_register_tokens": getattr(backbone, "n_register_tokens", 0),
        "patch_size": patch,
        "embed_dim": backbone.embed_dim,
        "num_heads": backbone.num_heads if vit else None,
        "depth": getattr(backbone, "depth", None),
        "token_layers": token_layers(backbone),
        "outputs": output_names(backbone),
    }


def _file_entries(folder: Path) -> dict[str, FileEntry]:
    return {
        f: FileEntry(sha256=sha256_file(folder / f), bytes=(folder / f).stat().st_size)
        for f in (MODEL_FILE, INT8_FILE, *OPENVINO_INT8_FILES)
        if (folder / f).is_file()
    }


def _check_request(backbone: nn.Module, name: str, train_image_size: int, eval_crop: int):
    """The ViT patch size (``None`` for a ResNet); ``ValueError`` for a name or size that cannot
    be exported."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"model name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    patch = backbone.patch_size if backbone.family == "vit" else None
    if patch and train_image_size % patch:
        raise ValueError(f"train_image_size {train_image_size} is not a multiple of patch {patch}")
    if patch and eval_crop % patch:
        log.warning(
            "eval crop %d is not a multiple of patch %d; servers must pad", eval_crop, patch
        )
    return patch


@contextlib.contextmanager
def _staging_folder(models_dir: Path, name: str) -> Iterator[Path]:
    """A fresh folder to write the artifact into, removed again if anything fails.

    Staged in a hidden sub-folder of the store (same filesystem, so the final move is a rename):
    a server scanning the store for <dir>/manifest.json never sees a staged or old copy."""
    staging = models_dir / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    remove_stale(staging, name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=staging))
    try:
        os.chmod(
            tmp, 0o755
        )  # mkdtemp's 0700 would hide the model from a server run as another user
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):  # only when empty: another export may be staging
            staging.rmdir()


def _write_checked_onnx(
    model: nn.Module, path: Path, what: str, size: int, photo_eval: tuple, pooling: str
) -> list:
    """``model.onnx`` at ``path``, checked by onnx and against PyTorch on shapes around a photo
    preprocessed as ``photo_eval`` = (resize, mean, std) says (``ParityError`` when they
    disagree); returns the parity records for the manifest."""
    patch = model.patch_size if model.family == "vit" else None
    t0 = time.perf_counter()
    export_onnx(model, path, size, pooling)
    onnx.checker.check_model(str(path))
    log.info(
        "export: %s -> %s (%.1f MB) in %.1f s",
        what,
        path.name,
        path.stat().st_size / 1e6,
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    resize, mean, std = photo_eval
    photo = eval_pixels(load_photo("astronaut"), resize, size, mean, std)
    inputs = parity_inputs(size, patch or 32, photo) + far_parity_inputs(model)
    parity = check_parity(model, path, inputs, pooling)
    log.info(
        "parity: %d shapes in %.1f s, min embedding cosine %.7f",
        len(parity),
        time.perf_counter() - t0,
        min(p.embedding_cosine_min for p in parity),
    )
    return parity


def _backbone(args: argparse.Namespace, obj: Mapping, config: dict) -> tuple[nn.Module, str, int]:
    """The network to export, its arch and training image size: flags win; otherwise a
    checkpoint that records its training config (ours, or an official full checkpoint's
    ``args``) says how to rebuild it."""
    from training.backbones import ARCHS, build_backbone, family_kwargs, is_family_arch
    from training.checkpoints import extract_backbone_state_dict, load_backbone_weights

    arch = args.arch or config.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"pass --arch (one of {ARCHS}): the checkpoint does not name one")
    patch_size = args.patch_size or config.get("patch_size") or DEFAULT_PATCH_SIZE
    is_vit = arch.startswith("vit")
    # Build at the checkpoint's own size so its positional embedding loads as is.
    size = args.image_size
    if size is None and is_vit and obj:
        size = inferred_image_size(obj, args.which, patch_size)
    size = size or IMAGENET_IMAGE_SIZE
    kw: dict[str, Any] = {"img_size": size} if is_vit else {}
    depth = args.depth or config.get("vit_depth")
    if is_vit and depth:
        kw["depth"] = depth
    if is_family_arch(arch) and obj:  # a hub name: the file's own depth and position grid
        kw = family_kwargs(arch, extract_backbone_state_dict(obj, args.which))
    torch.manual_seed(args.seed)
    backbone = build_backbone(arch, patch_size, **kw)
    if args.checkpoint is not None:
        load_backbone_weights(backbone, obj, which=args.which)
    return backbone, arch, size


def run(argv: Sequence[str] | None = None) -> Path:
    """The export command: the published folder; raises on bad input or a failed export."""
    from training.checkpoints import read_checkpoint

    args = _parse(argv)
    if args.centre_on:
        check_centring_source(args.centre_on)
    obj: Mapping = read_checkpoint(args.checkpoint) if args.checkpoint is not None else {}
    config, knn = checkpoint_meta(obj)
    config = config or {}
    backbone, arch, size = _backbone(args, obj, config)
    # Ours: the run's normalisation and eval sizes; official: ImageNet's at the trained size.
    settings = checkpoint_eval_settings(config, size)
    provenance: dict[str, Any] = {"source": "random", "git_commit": git_commit()}
    if args.checkpoint is not None:
        provenance.update(
            source="checkpoint",
            checkpoint_sha256=sha256_file(args.checkpoint),
            training_config=config,
        )
    path = export_backbone(
        backbone,
        args.name,
        args.models_dir,
        arch=arch,
        train_image_size=size,
        **settings.export_kwargs(),
        provenance=provenance,
        knn=knn,
        int8=args.int8,
        int8_openvino=args.int8_openvino,
        int8_labels=args.int8_labels,
        pooling=args.pooling or config.get("embedding_pooling", "cls"),
    )
    if args.centre_on and not centre_exported(path, args):  # fitted on the published graph
        raise RuntimeError(f"exported {path}, but its embedding transform could not be fitted")
    print(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.export``: exit 0; 2 for bad input (a corrupt or mismatched
    checkpoint, a bad name), 1 when the export fails (parity); nothing is written on failure."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    return run_cli(run, argv, prog="python -m training.export")


if __name__ == "__main__":
    sys.exit(main())
