"""Endpoints that only run the model: /embed, /attention, /models."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import Response

from artifact.cosine import l2_normalise
from service.attention import patch_maps, threshold_masks
from service.embedding_transform import describe, transform_key
from service.preprocess import attention_pixels, eval_pixels
from service.render import overlay_png
from service.routes_common import ModelRuntimeDep, read_images
from service.schemas import AttentionResponse, EmbedResponse, ModelInfo, error_responses

router = APIRouter(tags=["model"])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=error_responses(400, 413, 415, 422, 503),
    summary="Embed images (CLS feature, L2-normalised by default)",
)
async def embed(
    rt: ModelRuntimeDep,
    images: Annotated[list[UploadFile], File(description="1..N image files")],
    normalize: Annotated[bool, Form(description="L2-normalise each embedding")] = True,
    raw: Annotated[
        bool,
        Form(description="the raw CLS embedding, without the artifact's centring / whitening"),
    ] = False,
) -> EmbedResponse:
    manifest, batcher = rt.model_parts()
    pixels = await read_images(rt, images, lambda img: eval_pixels(img, manifest))
    out = await batcher.infer(pixels, ("embedding",))
    rows = out["embedding"]
    transform = None if raw else rt.transform
    if transform is not None:
        rows = transform.apply(rows)
    if normalize:
        rows = l2_normalise(rows)
    return EmbedResponse(
        model=manifest.name,
        dim=int(rows.shape[1]),
        normalized=normalize,
        transform=transform_key(transform),
        embeddings=rows.tolist(),
    )


@router.post(
    "/attention",
    response_model=AttentionResponse,
    responses={
        **error_responses(400, 409, 413, 415, 422, 503),
        200: {"content": {"image/png": {}}, "description": "JSON maps, or a PNG overlay"},
    },
    summary="Last-block CLS attention per head, as JSON maps or a PNG overlay",
)
async def attention(
    rt: ModelRuntimeDep,
    image: Annotated[UploadFile, File(description="one image file")],
    format: Annotated[
        Literal["json", "png"], Form(description="json maps or png overlay")
    ] = "json",
    threshold: Annotated[
        float | None,
        Form(ge=0.0, le=1.0, description="share of attention each mask keeps (DINO's masks)"),
    ] = None,
    head: Annotated[
        int | None, Form(ge=0, description="png only: draw this head instead of the mean")
    ] = None,
) -> AttentionResponse | Response:
    manifest, batcher = rt.model_parts()
    if not manifest.has_attention:
        raise HTTPException(
            409, f"model {manifest.name!r} ({manifest.arch}) has no attention maps; serve a ViT"
        )
    heads = manifest.num_heads or 1
    if head is not None and head >= heads:
        raise HTTPException(422, f"head must be within 0..{heads - 1} for this model")
    max_side = rt.attention_max_side
    (prepared,) = await read_images(
        rt, [image], lambda img: attention_pixels(img, manifest, max_side)
    )
    out = await batcher.infer([prepared.pixels], ("attention",))
    maps = patch_maps(out["attention"][0], prepared.grid)
    patch = manifest.patch_size or 1
    if format == "png":
        shown = maps[head] if head is not None else maps.mean(axis=0)
        mask = None if threshold is None else threshold_masks(shown[None], threshold)[0]
        png = overlay_png(prepared.image, shown, patch, mask)
        return Response(png, media_type="image/png")
    masks = None if threshold is None else threshold_masks(maps, threshold).tolist()
    return AttentionResponse(
        model=manifest.name,
        heads=int(maps.shape[0]),
        grid=prepared.grid,
        image_size=prepared.image_size,
        patch_size=patch,
        maps=np.round(maps, 8).tolist(),
        threshold=threshold,
        masks=masks,
    )


@router.get(
    "/models",
    response_model=ModelInfo,
    summary="The loaded model's manifest (filesystem paths of its training run left out)",
)
async def models(rt: ModelRuntimeDep) -> ModelInfo:
    manifest = rt.loaded_manifest()
    info = manifest.model_dump()
    info["provenance"]["training_config"] = without_paths(info["provenance"]["training_config"])
    info["knn"] = without_paths(info["knn"])
    return ModelInfo(
        **info,
        variant=rt.served_variant,
        engine_choice=rt.choice.summary() if rt.choice else None,
        served_file=rt.served_file,
        sha256=manifest.model_sha256,
        served_dim=rt.embed_dim,
        applied_transform=describe(rt.transform),
    )


# Keys of a training configuration that name files or folders (the project's own and DINO's).
PATH_KEYS = re.compile(r"(^|_)(dir|path|file|root|data|resume|checkpoint|output)s?$", re.I)


def without_paths(value: Any) -> Any:
    """A config with every filesystem path left out: keys that name one (``data``,
    ``*_dir``, ``output_dir``, ``resume``...) and any string value that looks like a path.
    The hyper-parameters stay; where the server's files live is nobody's business."""
    if isinstance(value, dict):
        return {
            k: without_paths(v)
            for k, v in value.items()
            if not (PATH_KEYS.search(str(k)) and isinstance(v, str | None)) and not _pathy(v)
        }
    if isinstance(value, list):
        return [without_paths(v) for v in value if not _pathy(v)]
    return value


def _pathy(value: Any) -> bool:
    return isinstance(value, str) and (
        "/" in value or "\\" in value or value.startswith("~") or value in (".", "..")
    )
