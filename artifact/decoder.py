"""``models/<name>/decoder.json``: the patch-token decoder exported beside a ViT model.

``decoder.onnx`` takes ``patch_grid`` float32 ``[B, D, h, w]`` (the model's ``patch_tokens``
``[B, h*w, D]`` reshaped row-major) and gives ``image`` ``[B, 3, h*p, w*p]``, RGB in [0, 1].
``backbone_sha256`` pins the decoder to the weights it was trained on. Written by
``training.invert`` (through ``training.decoder_export``), read by the server's ``/reconstruct``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from artifact.manifest import (
    FORMAT_VERSION,
    ArtifactError,
    Manifest,
    Strict,
    read_json,
    verify_file,
)
from artifact.names import DECODER_FILE, DECODER_INPUT, DECODER_META, DECODER_OUTPUT

INPUT_LAYOUT = "[B, D, h, w]: patch_tokens [B, h*w, D] reshaped row-major"


class DecoderParity(Strict):
    """ONNX Runtime vs PyTorch at one input shape."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float


class DecoderMeta(Strict):
    format_version: int = FORMAT_VERSION
    file: str = DECODER_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)
    input: str = DECODER_INPUT
    input_layout: str = INPUT_LAYOUT
    output: str = DECODER_OUTPUT
    output_range: tuple[float, float] = (0.0, 1.0)
    backbone: str = Field(description="the model's name when the decoder was exported")
    backbone_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    patch_size: int = Field(gt=0)
    embed_dim: int = Field(gt=0)
    decoder: dict = Field(description="the PatchDecoder's constructor arguments")
    opset: int
    parity: tuple[DecoderParity, ...]
    training: dict = Field(description="how the decoder was trained (steps, loss, data)")
    git_commit: str | None = None
    exported_at: str


class DecoderUnavailable(ArtifactError):
    """No usable decoder beside a model; the message says what to do."""


def read_decoder_meta(model_dir: Path) -> DecoderMeta:
    """``model_dir/decoder.json``, validated; ``DecoderUnavailable`` when it is missing,
    malformed or of an unknown format version."""
    path = model_dir / DECODER_META
    if not path.is_file():
        raise DecoderUnavailable(f"{path} not found")
    try:
        return DecoderMeta.model_validate(read_json(path))
    except ValidationError as exc:
        raise DecoderUnavailable(f"{path} is not a valid decoder description: {exc}") from exc
    except ArtifactError as exc:
        raise DecoderUnavailable(str(exc)) from exc


def load_decoder_meta(model_dir: Path | str, manifest: Manifest) -> DecoderMeta:
    """The decoder beside the model in ``model_dir``, checked against ``manifest``: trained for
    these weights, this patch size and width, and its file matching its sha256. Raises
    ``DecoderUnavailable`` with the fix in the message."""
    model_dir = Path(model_dir)
    if not (model_dir / DECODER_META).is_file():
        raise DecoderUnavailable(
            f"model {manifest.name!r} has no decoder; train and export one with "
            f"`python -m training.invert --checkpoint <its checkpoint> --model-dir {model_dir}`"
        )
    meta = read_decoder_meta(model_dir)
    if meta.backbone_sha256 != manifest.model_sha256:
        raise DecoderUnavailable(
            f"the decoder beside {manifest.name!r} was trained for other weights; "
            "re-run `python -m training.invert` for this model"
        )
    if (meta.patch_size, meta.embed_dim) != (manifest.patch_size, manifest.embed_dim):
        raise DecoderUnavailable(
            f"the decoder beside {manifest.name!r} takes patch {meta.patch_size} tokens of width "
            f"{meta.embed_dim}; the model has patch {manifest.patch_size}, width "
            f"{manifest.embed_dim}. Re-run `python -m training.invert` for this model"
        )
    try:
        verify_file(model_dir, meta.file, meta.sha256)
    except ArtifactError as exc:
        fix = "re-run `python -m training.invert`"
        raise DecoderUnavailable(f"{exc} ({DECODER_META}); {fix}") from exc
    return meta
