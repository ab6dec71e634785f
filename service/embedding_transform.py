"""The artifact's embedding transform: centre (and optionally whiten) raw CLS embeddings.

Raw DINO CLS embeddings share a large common direction, so the cosine of any two images sits in a
narrow band near 1 and cannot serve as a threshold. Subtracting the mean embedding of a reference
set (and, for "whiten", projecting onto its PCA axes scaled to unit variance, as DINO's
copy-detection evaluation does) spreads the scores out: unrelated images score near 0, copies
near 1. The arrays are fitted at export time (``training.centring``) and stored beside the model
in ``embedding_transform.npz``, whose sha256 the manifest records.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifact import ArtifactError, EmbeddingTransformInfo, Manifest, sha256_file
from artifact.cosine import l2_normalise

TRANSFORM_FILE = "embedding_transform.npz"
NO_TRANSFORM = "none"  # what the index records for vectors that are only L2-normalised


@dataclass(frozen=True)
class EmbeddingTransform:
    info: EmbeddingTransformInfo
    mean: np.ndarray  # float32 [input_dim]
    projection: np.ndarray | None  # float32 [input_dim, output_dim] for "whiten"

    @property
    def key(self) -> str:
        """The identity the index records: kind and the arrays' sha256."""
        return f"{self.info.kind}:{self.info.sha256}"

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw embeddings [n, input_dim] -> transformed rows [n, output_dim] (not normalised)."""
        out = np.asarray(raw, np.float32) - self.mean
        if self.projection is not None:
            out = out @ self.projection
        return out


def transform_key(transform: EmbeddingTransform | None) -> str:
    return NO_TRANSFORM if transform is None else transform.key


def served_vectors(transform: EmbeddingTransform | None, raw: np.ndarray) -> np.ndarray:
    """What the index stores and compares: the transform (if any), then L2 normalisation."""
    rows = np.asarray(raw, np.float32) if transform is None else transform.apply(raw)
    return l2_normalise(rows)


def served_dim(manifest: Manifest) -> int:
    info = manifest.embedding_transform
    return manifest.embedding_dim if info is None else info.output_dim


def describe(transform: EmbeddingTransform | None) -> dict:
    """For /models: what the server does to the raw CLS embedding."""
    if transform is None:
        return {"applied": "l2", "kind": None}
    info = transform.info
    steps = "subtract mean, project, l2" if info.kind == "whiten" else "subtract mean, l2"
    return {"applied": steps, **info.model_dump()}


def read_arrays(data: bytes, info: EmbeddingTransformInfo) -> tuple[np.ndarray, np.ndarray | None]:
    """Parse and check the npz payload against what the manifest says it holds."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            mean = np.asarray(npz["mean"], np.float32)
            projection = np.asarray(npz["projection"], np.float32) if "projection" in npz else None
    except (ValueError, KeyError, OSError) as exc:
        raise ArtifactError(f"{info.file} is not a valid embedding transform: {exc}") from exc
    if mean.shape != (info.input_dim,) or not np.isfinite(mean).all():
        raise ArtifactError(f"{info.file}: mean has shape {mean.shape}, want ({info.input_dim},)")
    want = (info.input_dim, info.output_dim) if info.kind == "whiten" else None
    got = None if projection is None else projection.shape
    if got != want or (projection is not None and not np.isfinite(projection).all()):
        raise ArtifactError(f"{info.file}: projection has shape {got}, the manifest says {want}")
    return mean, projection


def load_transform(model_dir: Path | str, manifest: Manifest) -> EmbeddingTransform | None:
    """The artifact's transform, checked against the manifest's sha256 and dims; None if none."""
    info = manifest.embedding_transform
    if info is None:
        return None
    if info.input_dim != manifest.embedding_dim:
        raise ArtifactError(
            f"embedding_transform.input_dim {info.input_dim} != the embedding width "
            f"{manifest.embedding_dim}"
        )
    path = Path(model_dir) / info.file
    if path.name != info.file or not path.is_file():
        raise ArtifactError(
            f"{path} is named by the manifest but missing: re-run "
            f"`python -m training.centre --model {Path(model_dir)}` or re-export"
        )
    if sha256_file(path) != info.sha256:
        raise ArtifactError(f"{path} does not match its sha256 in the manifest; re-fit it")
    mean, projection = read_arrays(path.read_bytes(), info)
    return EmbeddingTransform(info, mean, projection)
