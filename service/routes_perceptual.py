"""Perceptual endpoints: ``POST /distance`` (two images) and ``POST /reconstruct`` (decoder PNG).

Torch-free: numpy and Pillow here; the graphs run on the runtime's engine.

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
described by ``decoder.json``; opened once at start with the server's engine choice, see
``Runtime._open_decoder``) on the image's patch tokens, the image reflect-padded to whole patches
as for ``/attention``, and returns the reconstruction cropped back to the image as PNG.
"""

from __future__ import annotations

import io
import logging
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, Field

from artifact import LAYER_TOKENS, Manifest
from artifact.cosine import row_cosines
from artifact.transform import RESAMPLE
from service.preprocess import attention_pixels, eval_pixels, normalise
from service.routes_common import ModelRuntimeDep, read_images
from service.runtime import Runtime
from service.schemas import error_responses

log = logging.getLogger(__name__)
router = APIRouter(tags=["perceptual"])


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
    resized = img.resize((size, size), RESAMPLE[manifest.eval_transform.interpolation])
    arr = normalise(resized, manifest.mean, manifest.std)
    pad = -size % (manifest.patch_size or 1)
    if pad:
        arr = np.pad(arr, ((0, 0), (0, pad), (0, pad)), mode="reflect")
    return np.ascontiguousarray(arr)


async def layer_distance(rt: Runtime, px: list[np.ndarray]) -> tuple[float, list[str]]:
    """Patch-token distance of two prepared images: the mean over the exported blocks of the
    mean over patches of ``1 - cos``, with the block names; ``["last"]`` on older artifacts."""
    manifest, batcher = rt.model_parts()
    if manifest.has_layer_tokens and manifest.token_layers:
        tok = (await batcher.infer(px, (LAYER_TOKENS,)))[LAYER_TOKENS]  # [2, L, N, D]
        per_layer = (1.0 - row_cosines(tok[0], tok[1])).mean(axis=-1)  # [L]
        return float(per_layer.mean()), [str(i) for i in manifest.token_layers]
    tok = (await batcher.infer(px, ("patch_tokens",)))["patch_tokens"]
    return float((1.0 - row_cosines(tok[0], tok[1])).mean()), ["last"]


async def perceptual_distance(
    rt: Runtime, first: Image.Image, second: Image.Image
) -> DistanceResponse:
    """Both distances between two decoded RGB images on the served model."""
    manifest, batcher = rt.model_parts()
    emb = await batcher.infer(
        [eval_pixels(first, manifest), eval_pixels(second, manifest)], ("embedding",)
    )
    e = emb["embedding"]
    embedding_distance = float(1.0 - row_cosines(e[0], e[1]))
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
    a, b = await read_images(rt, [image_a, image_b], lambda img: img)
    return await perceptual_distance(rt, a, b)


# ---------------------------------------------------------------------- decoder


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
    manifest, batcher = rt.model_parts()
    decoder, meta = rt.decoder, rt.decoder_meta
    if decoder is None or meta is None:  # opened once at start; this says why it could not be
        raise HTTPException(409, rt.decoder_error)
    (prepared,) = await read_images(
        rt, [image], lambda img: attention_pixels(img, manifest, rt.attention_max_side)
    )
    tokens = (await batcher.infer([prepared.pixels], ("patch_tokens",)))["patch_tokens"]
    h, w = prepared.grid
    grid = np.ascontiguousarray(tokens.reshape(1, h, w, -1).transpose(0, 3, 1, 2))
    out = (await anyio.to_thread.run_sync(decoder.run, grid, (meta.output,)))[meta.output]
    height, width = prepared.image_size
    pixels = out[0, :, :height, :width]  # crop the reflect padding back off
    png = to_png(pixels, prepared.image if side_by_side else None)
    return Response(png, media_type="image/png")
