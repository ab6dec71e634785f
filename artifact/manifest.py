"""``models/<name>/manifest.json``: what an exported model is and how to feed it.

Written by ``training.export``, read by the server. ``FORMAT_VERSION`` goes up on every change
to the artifact contract (files, fields, outputs, preprocessing); a reader refuses versions it
does not know with a message naming both versions and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from artifact import names
from artifact.files import sha256_file, write_text_atomic

# 2: the eval transform is pinned to torchvision's rounding everywhere (parity check, int8 gate,
#    server) and decoder.json is a typed schema. The files are those of version 1, so version-1
#    folders are still read (READABLE_VERSIONS).
# 3: ``embedding_pooling`` says which vector the ``embedding`` output is (the CLS token, the mean
#    of the patch tokens, or both concatenated); older folders are read as ``cls``, which is what
#    their graphs compute. New exports are always written as version 3.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# What the ``embedding`` output is: ``cls`` the backbone's own image vector (a ViT's CLS token, a
# convnet's pooled features); ``patch_mean`` the mean of the final patch tokens; ``cls+patch_mean``
# both, concatenated (twice the width), as DINOv2's linear probes read a ViT.
POOLINGS = ("cls", "patch_mean", "cls+patch_mean")
Pooling = Literal["cls", "patch_mean", "cls+patch_mean"]


class ArtifactError(ValueError):
    """The artifact on disk is missing, malformed or does not match its manifest."""


class Strict(BaseModel):
    """Unknown fields are errors: a typo or a newer writer's field never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalTransform(Strict):
    """DINO's k-NN protocol: resize the short side, centre-crop, normalise."""

    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    @model_validator(mode="after")
    def _crop_fits(self) -> EvalTransform:
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self


class FileEntry(Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)


class Variant(Strict):
    """An extra ONNX file with the same inputs and outputs (e.g. int8)."""

    file: str
    precision: str
    embedding_cosine_min: float = Field(description="min cosine vs fp32 on the bundled photos")
    embedding_cosine_mean: float
    engine: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime", description="the engine the file is quantised for (the one that runs it)"
    )
    knn_change: float | None = Field(
        default=None, description="weighted k-NN accuracy change vs fp32, in points, if measured"
    )


class ParityCheck(Strict):
    """ONNX Runtime vs PyTorch at one input shape."""

    shape: tuple[int, int, int, int]
    embedding_max_abs_diff: float
    embedding_cosine_min: float
    attention_max_abs_diff: float | None = None
    layer_tokens_max_abs_diff: float | None = None


class Provenance(Strict):
    source: Literal["training", "checkpoint", "random"]
    checkpoint_sha256: str | None = None
    git_commit: str | None = None
    training_config: dict | None = None
    exported_at: str
    torch_version: str
    exporter: str


class EmbeddingTransformInfo(Strict):
    """A fitted transform the server applies to the raw CLS embedding before L2 normalisation:
    subtract the mean ("centre"), and also project onto PCA axes scaled to unit variance
    ("whiten"). The arrays live in ``file`` (npz: ``mean`` [input_dim], and for "whiten"
    ``projection`` [input_dim, output_dim])."""

    kind: Literal["centre", "whiten"]
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_dim: int = Field(gt=0)
    output_dim: int = Field(gt=0)
    images: int = Field(gt=0, description="how many images the statistics were computed over")
    fitted_on: str = Field(description="where the images came from (a folder name or a dataset)")


class Manifest(Strict):
    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=names.NAME_PATTERN)
    arch: str
    family: Literal["vit", "resnet", "convnext"]
    lineage: Literal["dino", "dinov2", "dinov3"] = Field(
        default="dino", description="which DINO generation the architecture comes from"
    )
    n_register_tokens: int = Field(
        default=0,
        ge=0,
        description="register (DINOv2) or storage (DINOv3) tokens after CLS; left out of "
        "attention, patch_tokens and layer_tokens",
    )
    patch_size: int | None = Field(default=None, gt=0)
    embed_dim: int = Field(gt=0, description="the network's width (tokens are this wide)")
    embedding_pooling: Pooling = Field(
        default="cls", description="which vector the embedding output is (see POOLINGS)"
    )
    num_heads: int | None = Field(default=None, gt=0)
    depth: int | None = None
    token_layers: tuple[int, ...] | None = Field(
        default=None,
        description="the ViT blocks (0-based) whose patch tokens layer_tokens holds, in order",
    )
    train_image_size: int = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_transform: EvalTransform
    input_name: str = names.INPUT_NAME
    outputs: tuple[str, ...]
    opset: int
    files: dict[str, FileEntry]
    variants: dict[str, Variant] = {}
    provenance: Provenance
    knn: dict | None = Field(default=None, description="the training run's k-NN result")
    parity: tuple[ParityCheck, ...]
    embedding_transform: EmbeddingTransformInfo | None = Field(
        default=None, description="centring / whitening applied to embeddings before L2"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.family == "vit":
            if self.patch_size is None or self.num_heads is None:
                raise ValueError("a ViT manifest needs patch_size and num_heads")
            if tuple(self.outputs) not in (names.VIT_OUTPUTS, names.LEGACY_VIT_OUTPUTS):
                raise ValueError(
                    f"a ViT artifact has outputs {names.VIT_OUTPUTS}, got {self.outputs}"
                )
            self._check_token_layers()
        elif tuple(self.outputs) != names.RESNET_OUTPUTS:
            raise ValueError(
                f"a convnet artifact has outputs {names.RESNET_OUTPUTS}, got {self.outputs}"
            )
        elif self.token_layers is not None:
            raise ValueError("token_layers is for ViT artifacts only")
        if names.MODEL_FILE not in self.files:
            raise ValueError(f"files must list {names.MODEL_FILE}")
        for key, variant in self.variants.items():
            if variant.file not in self.files:
                raise ValueError(f"variant {key!r} names {variant.file}, which files does not list")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        if self.embedding_pooling != "cls" and self.family != "vit":
            raise ValueError("embedding_pooling other than cls needs a ViT (patch tokens)")
        return self

    def _check_token_layers(self) -> None:
        layers = self.token_layers
        if (names.LAYER_TOKENS in self.outputs) != (layers is not None):
            raise ValueError(
                f"token_layers goes with the {names.LAYER_TOKENS} output, and only with it"
            )
        if layers is None:
            return
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"token_layers must be distinct, ascending and >= 0, got {layers}")
        if self.depth is not None and layers[-1] >= self.depth:
            raise ValueError(f"token_layers {layers} name blocks beyond depth {self.depth}")

    @property
    def has_attention(self) -> bool:
        return "attention" in self.outputs

    @property
    def has_layer_tokens(self) -> bool:
        """Whether the graph gives several blocks' patch tokens (older ViT exports do not)."""
        return names.LAYER_TOKENS in self.outputs

    @property
    def embedding_dim(self) -> int:
        """Width of the ``embedding`` output (before any embedding transform)."""
        return self.embed_dim * (2 if self.embedding_pooling == "cls+patch_mean" else 1)

    @property
    def model_sha256(self) -> str:
        """Identity of the served weights (the fp32 file); the index is keyed on it."""
        return self.files[names.MODEL_FILE].sha256


def check_version(path: Path, version: Any) -> None:
    """Raise ``ArtifactError`` for a format version this build cannot read, saying the fix."""
    if version in READABLE_VERSIONS:
        return
    readable = ", ".join(map(str, READABLE_VERSIONS))
    newer = isinstance(version, int) and version > FORMAT_VERSION
    fix = (
        "upgrade this server to a release that reads it, or re-export the model with this "
        "version's `python -m training.export`"
        if newer
        else "re-export the model with this version's `python -m training.export`"
    )
    raise ArtifactError(
        f"{path} has format_version {version!r}; this build reads format_version {readable} "
        f"(and writes {FORMAT_VERSION}): {fix}"
    )


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` whose format version this build reads; ``ArtifactError``
    otherwise. The version is checked before the fields, so a newer file's new fields give the
    version message rather than a list of unknown fields."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object, not {type(data).__name__}")
    check_version(path, data.get("format_version"))
    return data


def verify_file(model_dir: Path, name: str, sha256: str) -> None:
    """``ArtifactError`` unless ``model_dir/name`` exists with this sha256."""
    file = model_dir / name
    if not file.is_file():
        raise ArtifactError(f"{file} is listed in {model_dir} but missing")
    if sha256_file(file) != sha256:
        raise ArtifactError(f"{file} does not match its recorded sha256; re-export")


def load_manifest(model_dir: Path | str, verify_files: bool = True) -> Manifest:
    """Read and validate ``model_dir/manifest.json``; optionally check every file's sha256."""
    model_dir = Path(model_dir)
    path = model_dir / names.MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{path} not found: export a model with `python -m training.export` "
            "or train one with `python -m training.run`"
        )
    data = read_json(path)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"{path} is not a valid manifest: {exc}") from exc
    if verify_files:
        for name, entry in manifest.files.items():
            verify_file(model_dir, name, entry.sha256)
    return manifest


def write_manifest(manifest: Manifest, model_dir: Path | str) -> Path:
    """Write ``model_dir/manifest.json`` (atomically: a reader never sees half of it)."""
    path = Path(model_dir) / names.MANIFEST_NAME
    write_text_atomic(path, json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path
