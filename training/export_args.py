"""The command line of ``python -m training.export``: its flags, their help and their checks."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from artifact import POOLINGS
from artifact.cli import DefaultsHelpFormatter
from training.centring import add_arguments as add_centring_arguments
from training.eval_settings import DEFAULT_PATCH_SIZE, IMAGENET_IMAGE_SIZE
from training.int8_gate import LABELLED_SETS

DESCRIPTION = (
    "Export a backbone to a servable artifact: models/<name>/ holding model.onnx, manifest.json\n"
    "and optionally int8 variants."
)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="ours, an official DINO .pth or a state dict"
    )
    source.add_argument(
        "--random-init", action="store_true", help="export untrained weights (tests, baselines)"
    )


def _add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write a dynamic int8 variant (kept only if embedding cosine vs fp32 >= 0.99 on "
        "photos and, with --int8-labels, k-NN changes <= 0.5 points)",
    )
    parser.add_argument(
        "--int8-openvino",
        action="store_true",
        help="also write OpenVINO static int8 (NNCF, calibrated on ~300 offline photos; kept only "
        "if embedding cosine vs fp32 >= 0.99 and, with --int8-labels, k-NN changes <= 0.5 points)",
    )
    parser.add_argument(
        "--int8-labels",
        nargs="+",
        choices=LABELLED_SETS,
        default=[],
        help="labelled sets for the int8 variants' k-NN gate (sklearn digits, Fashion-MNIST's "
        "test split; a variant whose k-NN moves more than 0.5 points on any is dropped); "
        "default: the cosine gate only",
    )
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="which vector the embedding is: the CLS token, the mean of the patch tokens, or "
        "both concatenated (ViTs); default: the training run's own, else cls",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from training.backbones import ARCHS

    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description=DESCRIPTION,
        formatter_class=DefaultsHelpFormatter,
    )
    _add_source_arguments(parser)
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        help="default: the checkpoint's own (ours and official full ones); needed for bare "
        "state dicts and --random-init",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        help=f"ViT patch size; default: the checkpoint's own, else {DEFAULT_PATCH_SIZE}. Pass 8 "
        "for the official /8 files",
    )
    parser.add_argument(
        "--depth", type=int, help="ViT depth; default: the checkpoint's own, else the arch's"
    )
    parser.add_argument("--name", required=True, help="folder name under --models-dir")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        help="model store the server reads (its DINO_MODELS_DIR)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="training image size; default: read from a ViT checkpoint's positional embedding, "
        f"else {IMAGENET_IMAGE_SIZE}. Change it only for bare ResNet weights trained at another "
        "size",
    )
    parser.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="network of a training checkpoint; DINO evaluates the teacher",
    )
    _add_int8_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    add_centring_arguments(parser, "--centre-on")
    args = parser.parse_args(argv)
    if args.whiten and not args.centre_on:
        parser.error("--whiten needs --centre-on DIR|training")
    return args
