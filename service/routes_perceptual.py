"""Perceptual endpoints: ``POST /distance`` (two images) and ``POST /reconstruct`` (decoder PNG).

Torch-free: onnxruntime, numpy and Pillow only.

``/distance`` gives two numbers. ``embedding_distance`` is ``1 - cos`` of the CLS embeddings, each
image prepared exactly as ``/embed`` prepares it. ``patch_distance`` compares the images where
they are: both are resized to the model's crop size (square, whole image, no crop) so their patch
grids align. Per block of the artifact's ``layer_tokens`` (the manifest's ``token_layers``: the
last 4 blocks, each through the final norm) it is the mean over patches of ``1 - cos`` between
the two images' tokens, and ``patch_distance`` is the mean over those blocks: the feature term of
``training.perceptual.FeaturePredictionLoss`` with its default layers and equal weights. ViT
artifacts exported before ``layer_tokens`` existed get the last block's ``patch_tokens`` only
(``patch_layers: ["last"]``).

``/reconstruct`` runs ``decoder.onnx`` (written by ``python -m training.invert`` beside the model,
described by ``decoder.json``) on the image's patch tokens, the image reflect-padded to whole
patches as for ``/attention``, and returns the reconstruction cropped back to the image as PNG.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path
from typing import Annotated

import anyio
import numpy as np
import onnxruntime as ort
from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, Field

from artifact import LAYER_TOKENS, MODEL_FILE, Manifest, sha256_file
from service.preprocess import attention_pixels, eval_pixels, normalise
from service.routes_common import ModelRuntimeDep, read_images
from service.runtime import Runtime
from service.schemas import error_responses

log = logging.getLogger(__name__)
router = APIRouter(tags=["perceptual"])

DECODER_META = "decoder.json"
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class DistanceResponse(BaseModel):
    model: str
    embedding_distance: float = Field(description="1 - cosine of the CLS embeddings (0..2)")
    patch_distance: float | None = Field(
        description="mean over the compared ViT blocks of (mean over patches of 1 - cosine of "
        "their patch tokens), both images resized to the model's crop size; null for a model "
        "without patch tokens"
    )
    patch_layers: list[str] = Field(
        description="the blocks patch_distance compares (0-based indices, e.g. "
        '["8", "9", "10", "11"]), or ["last"] for an artifact without layer_tokens'
    )
    grid: list[int] | None = Field(description="patch grid compared [h, w]")


def square_pixels(img: Image.Image, manifest: Manifest) -> np.ndarray:
    """The whole image resized to crop x crop and normalised, reflect-padded to whole patches."""
    size = manifest.eval_transform.crop
    resized = img.resize((size, size), _RESAMPLE[manifest.eval_transform.interpolation])
    arr = normalise(resized, manifest.mean, manifest.std)
    pad = -size % (manifest.patch_size or 1)
    if pad:
        arr = np.pad(arr, ((0, 0), (0, pad), (0, pad)), mode="reflect")
    return np.ascontiguousarray(arr)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis), float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return (a * b).sum(axis=-1) / den


async def layer_distance(rt: Runtime, px: list[np.ndarray]) -> tuple[float, list[str]]:
    """Patch-token distance of two prepared images: the mean over the exported blocks of the
    mean over patches of ``1 - cos``, with the block names; ``["last"]`` on older artifacts."""
    manifest = rt.manifest
    assert manifest is not None and rt.batcher is not None
    if manifest.has_layer_tokens and manifest.token_layers:
        tok = (await rt.batcher.infer(px, (LAYER_TOKENS,)))[LAYER_TOKENS]  # [2, L, N, D]
        per_layer = (1.0 - cosine_rows(tok[0], tok[1])).mean(axis=-1)  # [L]
        return float(per_layer.mean()), [str(i) for i in manifest.token_layers]
    tok = (await rt.batcher.infer(px, ("patch_tokens",)))["patch_tokens"]
    return float((1.0 - cosine_rows(tok[0], tok[1])).mean()), ["last"]


async def perceptual_distance(
    rt: Runtime, first: Image.Image, second: Image.Image
) -> DistanceResponse:
    """Both distances between two decoded RGB images on the served model."""
    manifest = rt.manifest
    assert manifest is not None and rt.batcher is not None
    emb = await rt.batcher.infer(
        [eval_pixels(first, manifest), eval_pixels(second, manifest)], ("embedding",)
    )
    e = emb["embedding"]
    embedding_distance = float(1.0 - cosine_rows(e[0], e[1]))
    patch_distance, grid, layers = None, None, []
    if "patch_tokens" in manifest.outputs:
        px = [square_pixels(first, manifest), square_pixels(second, manifest)]
        patch_distance, layers = await layer_distance(rt, px)
        side = px[0].shape[-1] // (manifest.patch_size or 1)
        grid = [side, side]
    return DistanceResponse(
        model=manifest.name,
        embedding_distance=embedding_distance,
        patch_distance=patch_distance,
        patch_layers=layers,
        grid=grid,
    )


@router.post(
    "/distance",
    response_model=DistanceResponse,
    responses=error_responses(400, 413, 415, 422, 503),
    summary="Perceptual distance between two images (embedding and patch features)",
)
async def distance(
    rt: ModelRuntimeDep,
    image_a: Annotated[UploadFile, File(description="first image")],
    image_b: Annotated[UploadFile, File(description="second image")],
) -> DistanceResponse:
    (a, _), (b, _) = await read_images(rt, [image_a, image_b], lambda img: None)
    return await perceptual_distance(rt, a, b)


# ---------------------------------------------------------------------- decoder


class DecoderUnavailable(Exception):
    """No usable decoder beside the served model; the message says what to do."""


class Decoder:
    """``decoder.onnx`` checked against ``decoder.json`` and the served model's sha256."""

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int) -> None:
        meta_path = model_dir / DECODER_META
        if not meta_path.is_file():
            raise DecoderUnavailable(
                f"model {manifest.name!r} has no decoder; train and export one with "
                f"`python -m training.invert --checkpoint <its checkpoint> --model-dir {model_dir}`"
            )
        try:
            meta = json.loads(meta_path.read_text())
            path = model_dir / meta["file"]
            want_sha, backbone_sha = meta["sha256"], meta["backbone_sha256"]
            self.input, self.output = meta["input"], meta["output"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DecoderUnavailable(f"{meta_path} is unreadable or incomplete: {exc}") from exc
        if backbone_sha != manifest.files[MODEL_FILE].sha256:
            raise DecoderUnavailable(
                f"the decoder beside {manifest.name!r} was trained for other weights; "
                "re-run `python -m training.invert` for this model"
            )
        if not path.is_file() or sha256_file(path) != want_sha:
            raise DecoderUnavailable(f"{path} is missing or does not match {meta_path}; re-export")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.key = (str(model_dir), want_sha, backbone_sha)

    def run(self, grid: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output], {self.input: grid})
        return out


_decoders: dict[str, Decoder] = {}
_decoders_lock = threading.Lock()


def get_decoder(rt: Runtime) -> Decoder:
    """The served model's decoder, loaded once per process (re-checked when files change)."""
    assert rt.model_dir is not None and rt.manifest is not None
    key = str(rt.model_dir)
    with _decoders_lock:
        dec = _decoders.get(key)
        meta = rt.model_dir / DECODER_META
        stale = (
            dec is None
            or not meta.is_file()
            or json.loads(meta.read_text()).get("sha256") != dec.key[1]
        )
        if stale:
            _decoders.pop(key, None)
            dec = Decoder(rt.model_dir, rt.manifest, rt.settings.threads)
            _decoders[key] = dec
            log.info("loaded decoder %s", rt.model_dir / DECODER_META)
        return dec


def to_png(pixels: np.ndarray, original: Image.Image | None) -> bytes:
    """``[3, H, W]`` in [0, 1] -> PNG; with ``original``, the input on the left for comparison."""
    img = Image.fromarray((np.clip(pixels, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8))
    if original is not None:
        both = Image.new("RGB", (img.width * 2, img.height), "white")
        both.paste(original, (0, 0))
        both.paste(img, (img.width, 0))
        img = both
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@router.post(
    "/reconstruct",
    responses={
        **error_responses(400, 409, 413, 415, 422, 503),
        200: {"content": {"image/png": {}}, "description": "the decoder's reconstruction"},
    },
    response_class=Response,
    summary="What the features keep: the image decoded back from its patch tokens (PNG)",
)
async def reconstruct(
    rt: ModelRuntimeDep,
    image: Annotated[UploadFile, File(description="one image file")],
    side_by_side: Annotated[bool, Form(description="the input left of the reconstruction")] = False,
) -> Response:
    manifest = rt.manifest
    assert manifest is not None and rt.batcher is not None
    if "patch_tokens" not in manifest.outputs:
        raise HTTPException(409, f"model {manifest.name!r} ({manifest.arch}) has no patch tokens")
    try:
        decoder = await anyio.to_thread.run_sync(get_decoder, rt)
    except DecoderUnavailable as exc:
        raise HTTPException(409, str(exc)) from None
    ((_, prepared),) = await read_images(
        rt, [image], lambda img: attention_pixels(img, manifest, rt.attention_max_side)
    )
    tokens = (await rt.batcher.infer([prepared.pixels], ("patch_tokens",)))["patch_tokens"]
    h, w = prepared.grid
    grid = np.ascontiguousarray(tokens.reshape(1, h, w, -1).transpose(0, 3, 1, 2))
    out = await anyio.to_thread.run_sync(decoder.run, grid)
    height, width = prepared.image_size
    pixels = out[0, :, :height, :width]  # crop the reflect padding back off
    png = to_png(pixels, prepared.image if side_by_side else None)
    return Response(png, media_type="image/png")
