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
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from service.manifest import (
    INT8_FILE,
    MODEL_FILE,
    EvalTransform,
    FileEntry,
    Manifest,
    Provenance,
    Variant,
    load_manifest,
    sha256_file,
    write_manifest,
)
from training.atomic import STAGING_DIR, publish_dir, remove_stale
from training.centring import add_arguments as add_centring_arguments
from training.centring import centre_exported
from training.centring import check_source as check_centring_source
from training.onnx_graph import (
    EXPORTER,
    OPSET,
    export_onnx,
    inference_copy,
    output_names,
    token_layers,
)
from training.parity import (
    check_parity,
    load_photo,
    parity_inputs,
    preprocess,
)
from training.quantize import MIN_INT8_COSINE, int8_variant

# Named explicitly: run as ``python -m`` this module is ``__main__``.
log = logging.getLogger("training.export")

_NAME_PATTERN = Manifest.model_fields["name"].metadata[0].pattern


def knn_eval_sizes(image_size: int) -> tuple[int, int]:
    """DINO's k-NN eval transform (resize 256, centre crop 224) scaled to ``image_size``:
    224 -> (256, 224), 28 -> (32, 28)."""
    return round(image_size * 256 / 224), image_size


def git_commit() -> str | None:
    """The commit of this source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


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
) -> Path:
    """Export ``backbone`` to ``models_dir/name`` and return that folder.

    ``provenance`` holds ``source`` ("training", "checkpoint" or "random") and optionally
    ``checkpoint_sha256``, ``git_commit``, ``training_config``; the export time, torch version and
    exporter are added here. Raises ``ParityError`` (nothing written) when onnxruntime and PyTorch
    disagree. With ``int8`` the int8 variant is kept only if its min embedding cosine vs fp32 on
    the bundled photos reaches ``int8_min_cosine``; otherwise it is skipped with a warning.
    """
    if not isinstance(name, str) or not re.fullmatch(_NAME_PATTERN, name):
        raise ValueError(
            f"model name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    family = backbone.family
    patch = backbone.patch_size if family == "vit" else None
    if patch and train_image_size % patch:
        raise ValueError(f"train_image_size {train_image_size} is not a multiple of patch {patch}")
    if patch and eval_crop % patch:
        log.warning(
            "eval crop %d is not a multiple of patch %d; servers must pad", eval_crop, patch
        )
    # Validate the cheap parts first so a bad call fails before any work.
    prov = Provenance(
        **provenance,
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        torch_version=torch.__version__,
        exporter=EXPORTER,
    )
    transform = EvalTransform(resize=eval_resize, crop=eval_crop)
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    model = inference_copy(backbone)

    # Staged in a hidden sub-folder of the store (same filesystem, so the final move is a rename):
    # a server scanning the store for <dir>/manifest.json never sees a staged or old copy.
    staging = models_dir / STAGING_DIR
    staging.mkdir(exist_ok=True)
    remove_stale(staging, name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=staging))
    try:
        os.chmod(
            tmp, 0o755
        )  # mkdtemp's 0700 would hide the model from a server run as another user
        t0 = time.perf_counter()
        fp32_path = tmp / MODEL_FILE
        export_onnx(model, fp32_path, train_image_size)
        onnx.checker.check_model(str(fp32_path))
        log.info(
            "export: %s%s -> %s (%.1f MB) in %.1f s",
            arch,
            f"/{patch}" if patch else "",
            MODEL_FILE,
            fp32_path.stat().st_size / 1e6,
            time.perf_counter() - t0,
        )

        t0 = time.perf_counter()
        photo = preprocess(
            load_photo("astronaut"),
            round(train_image_size * eval_resize / eval_crop),
            train_image_size,
            mean,
            std,
        )
        inputs = parity_inputs(train_image_size, patch or 32, photo)
        parity = check_parity(model, fp32_path, inputs)
        log.info(
            "parity: %d shapes in %.1f s, min embedding cosine %.7f",
            len(parity),
            time.perf_counter() - t0,
            min(p.embedding_cosine_min for p in parity),
        )

        variants: dict[str, Variant] = {}
        if int8:
            variants = int8_variant(tmp, transform, mean, std, int8_min_cosine)

        t0 = time.perf_counter()
        files = {
            f: FileEntry(sha256=sha256_file(tmp / f), bytes=(tmp / f).stat().st_size)
            for f in (MODEL_FILE, INT8_FILE)
            if (tmp / f).is_file()
        }
        manifest = Manifest(
            name=name,
            arch=arch,
            family=family,
            patch_size=patch,
            embed_dim=backbone.embed_dim,
            num_heads=backbone.num_heads if family == "vit" else None,
            depth=getattr(backbone, "depth", None),
            token_layers=token_layers(backbone),
            train_image_size=train_image_size,
            mean=tuple(mean),
            std=tuple(std),
            eval_transform=transform,
            outputs=output_names(backbone),
            opset=OPSET,
            files=files,
            variants=variants,
            provenance=prov,
            knn=knn,
            parity=parity,
        )
        write_manifest(manifest, tmp)
        load_manifest(tmp, verify_files=True)  # the reader's own check, before anyone sees it
        final = models_dir / name
        publish_dir(tmp, final)
        log.info("write: %s (%d files) in %.1f s", final, len(files) + 1, time.perf_counter() - t0)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):  # only when empty: another export may be staging
            staging.rmdir()


def _json_safe(value: Any) -> Any:
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def _checkpoint_meta(obj: Mapping) -> tuple[dict | None, dict | None]:
    """The training config (ours: ``config``; official: ``args``) and k-NN result, if present."""
    config = obj.get("config", obj.get("args"))
    config = _json_safe(config) if config is not None else None
    knn = obj.get("knn")
    knn = _json_safe(knn) if isinstance(knn, Mapping) else None
    return (config if isinstance(config, dict) else None), knn


def _inferred_image_size(obj: Mapping, which: str, patch_size: int) -> int | None:
    """A ViT checkpoint's training size, from its positional-embedding grid."""
    from training.checkpoints import extract_backbone_state_dict

    pos = extract_backbone_state_dict(obj, which).get("pos_embed")
    if pos is None or pos.ndim != 3:
        return None
    grid = round((pos.shape[1] - 1) ** 0.5)
    return grid * patch_size if grid * grid == pos.shape[1] - 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    from training.augment import IMAGENET_MEAN, IMAGENET_STD
    from training.backbones import ARCHS, build_backbone
    from training.checkpoints import CheckpointError, load_backbone_weights, read_checkpoint
    from training.parity import ParityError

    parser = argparse.ArgumentParser(
        prog="python -m training.export", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="ours, an official DINO .pth or a state dict"
    )
    source.add_argument("--random-init", action="store_true", help="export untrained weights")
    parser.add_argument(
        "--arch", choices=ARCHS, help="default: the checkpoint's own (ours and official full ones)"
    )
    parser.add_argument(
        "--patch-size", type=int, help="ViT patch size (default: the checkpoint's own, else 16)"
    )
    parser.add_argument("--depth", type=int, help="ViT depth (default: the checkpoint's own)")
    parser.add_argument("--name", required=True, help="folder name under --models-dir")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training image size; default: read from a ViT checkpoint's positional embedding, "
        "else 224",
    )
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--int8", action="store_true", help="also write a dynamic int8 variant")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    add_centring_arguments(parser, "--centre-on")
    args = parser.parse_args(argv)
    if args.whiten and not args.centre_on:
        parser.error("--whiten needs --centre-on DIR|training")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)

    try:
        if args.centre_on:
            check_centring_source(args.centre_on)
        obj: Mapping = {}
        if args.checkpoint is not None:
            obj = read_checkpoint(args.checkpoint)
        config, knn = _checkpoint_meta(obj)
        config = config or {}
        # Flags win; otherwise a checkpoint that records its training config (ours, or an official
        # full checkpoint's ``args``) says how to rebuild its network and how it saw its images.
        arch = args.arch or config.get("arch")
        if arch not in ARCHS:
            raise ValueError(f"pass --arch (one of {ARCHS}): the checkpoint does not name one")
        patch_size = args.patch_size or config.get("patch_size") or 16
        is_vit = arch.startswith("vit")
        # Build at the checkpoint's own size so its positional embedding loads as is.
        size = args.image_size
        if size is None and is_vit and obj:
            size = _inferred_image_size(obj, args.which, patch_size)
        size = size or 224
        kw: dict[str, Any] = {"img_size": size} if is_vit else {}
        depth = args.depth or config.get("vit_depth")
        if is_vit and depth:
            kw["depth"] = depth
        torch.manual_seed(args.seed)
        backbone = build_backbone(arch, patch_size, **kw)
        ours = "eval_crop" in config  # the project's own run: its normalisation and eval sizes
        mean = tuple(config["mean"]) if ours else IMAGENET_MEAN
        std = tuple(config["std"]) if ours else IMAGENET_STD
        resize, crop = (
            (config["eval_resize"], config["eval_crop"]) if ours else knn_eval_sizes(size)
        )
        if args.checkpoint is not None:
            load_backbone_weights(backbone, obj, which=args.which)
            provenance = {
                "source": "checkpoint",
                "checkpoint_sha256": sha256_file(args.checkpoint),
                "git_commit": git_commit(),
                "training_config": config,
            }
        else:
            provenance = {"source": "random", "git_commit": git_commit()}
        path = export_backbone(
            backbone,
            args.name,
            args.models_dir,
            arch=arch,
            train_image_size=size,
            mean=mean,
            std=std,
            eval_resize=resize,
            eval_crop=crop,
            provenance=provenance,
            knn=knn,
            int8=args.int8,
        )
    except (CheckpointError, ParityError, ValueError) as exc:
        log.error("export failed, nothing written: %s", exc)
        return 1
    if args.centre_on and not centre_exported(path, args):  # fitted on the published graph
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
