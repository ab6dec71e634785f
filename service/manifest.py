"""The model artifact contract: ``models/<name>/manifest.json`` beside ``model.onnx``.

Written by ``training.export`` and read by the server. Torch-free on purpose: this module is the
only piece of ``service`` that ``training`` imports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAME = "pixel_values"
LAYER_TOKENS = "layer_tokens"
# What a ViT export writes today; artifacts exported before ``layer_tokens`` existed still load.
VIT_OUTPUTS = ("embedding", "patch_tokens", "attention", LAYER_TOKENS)
LEGACY_VIT_OUTPUTS = VIT_OUTPUTS[:3]
RESNET_OUTPUTS = ("embedding",)
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """The artifact on disk is missing, malformed or does not match its manifest."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalTransform(_Strict):
    """DINO's k-NN protocol: resize the short side, centre-crop, normalise."""

    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    @model_validator(mode="after")
    def _crop_fits(self) -> EvalTransform:
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)


class Variant(_Strict):
    """An extra ONNX file with the same inputs and outputs (e.g. int8)."""

    file: str
    precision: str
    embedding_cosine_min: float = Field(description="min cosine vs fp32 on the bundled photos")
    embedding_cosine_mean: float


class ParityCheck(_Strict):
    """ONNX Runtime vs PyTorch at one input shape."""

    shape: tuple[int, int, int, int]
    embedding_max_abs_diff: float
    embedding_cosine_min: float
    attention_max_abs_diff: float | None = None
    layer_tokens_max_abs_diff: float | None = None


class Provenance(_Strict):
    source: Literal["training", "checkpoint", "random"]
    checkpoint_sha256: str | None = None
    git_commit: str | None = None
    training_config: dict | None = None
    exported_at: str
    torch_version: str
    exporter: str


class EmbeddingTransformInfo(_Strict):
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


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    arch: str
    family: Literal["vit", "resnet"]
    patch_size: int | None = Field(default=None, gt=0)
    embed_dim: int = Field(gt=0)
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
    input_name: str = INPUT_NAME
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
            if tuple(self.outputs) not in (VIT_OUTPUTS, LEGACY_VIT_OUTPUTS):
                raise ValueError(f"a ViT artifact has outputs {VIT_OUTPUTS}, got {self.outputs}")
            self._check_token_layers()
        elif tuple(self.outputs) != RESNET_OUTPUTS:
            raise ValueError(f"a ResNet artifact has outputs {RESNET_OUTPUTS}, got {self.outputs}")
        elif self.token_layers is not None:
            raise ValueError("token_layers is for ViT artifacts only")
        if MODEL_FILE not in self.files:
            raise ValueError(f"files must list {MODEL_FILE}")
        for key, variant in self.variants.items():
            if variant.file not in self.files:
                raise ValueError(f"variant {key!r} names {variant.file}, which files does not list")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    def _check_token_layers(self) -> None:
        layers = self.token_layers
        if (LAYER_TOKENS in self.outputs) != (layers is not None):
            raise ValueError(f"token_layers goes with the {LAYER_TOKENS} output, and only with it")
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
        return LAYER_TOKENS in self.outputs

    @property
    def model_sha256(self) -> str:
        """Identity of the served weights (the fp32 file); the index is keyed on it."""
        return self.files[MODEL_FILE].sha256


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(model_dir: Path | str, verify_files: bool = True) -> Manifest:
    """Read and validate ``model_dir/manifest.json``; optionally check every file's sha256."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{path} not found: export a model with `python -m training.export` "
            "or train one with `python -m training.run`"
        )
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ArtifactError(f"{path} is not a valid manifest: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {manifest.format_version}; this build reads "
            f"{FORMAT_VERSION}. Re-export the model with this version of the project."
        )
    if verify_files:
        for name, entry in manifest.files.items():
            file = model_dir / name
            if not file.is_file():
                raise ArtifactError(f"{file} is listed in the manifest but missing")
            if sha256_file(file) != entry.sha256:
                raise ArtifactError(f"{file} does not match its sha256 in the manifest; re-export")
    return manifest


def write_manifest(manifest: Manifest, model_dir: Path | str) -> Path:
    path = Path(model_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path
