"""The model artifact contract, shared by ``training`` (writes) and ``service`` (reads).

Torch-free (numpy, pydantic, Pillow): what a folder under ``models/`` holds and how to read it.

* ``artifact.names``: file, input and output names; the model-name pattern.
* ``artifact.manifest``: ``manifest.json`` (typed), ``FORMAT_VERSION``, ``load_manifest``.
* ``artifact.decoder``: ``decoder.json`` (typed) and its checks against the model.
* ``artifact.transform``: THE eval transform (image -> float32 ``[3, crop, crop]``).
* ``artifact.files``: sha256 and atomic writes / folder publishing.
* ``artifact.cosine``: row cosines and L2 normalisation.
* ``artifact.photos``, ``artifact.cpu``: bundled test photos; CPU bf16 detection.

See ``docs/artifact.md``.
"""

from artifact.files import sha256_file
from artifact.manifest import (
    FORMAT_VERSION,
    POOLINGS,
    READABLE_VERSIONS,
    ArtifactError,
    EmbeddingTransformInfo,
    EvalTransform,
    FileEntry,
    Manifest,
    ParityCheck,
    Provenance,
    Variant,
    load_manifest,
    write_manifest,
)
from artifact.names import (
    DECODER_FILE,
    DECODER_INPUT,
    DECODER_META,
    DECODER_OUTPUT,
    INPUT_NAME,
    INT8_FILE,
    LAYER_TOKENS,
    LEGACY_VIT_OUTPUTS,
    MANIFEST_NAME,
    MODEL_FILE,
    NAME_PATTERN,
    RESNET_OUTPUTS,
    VIT_OUTPUTS,
)

__all__ = [
    "DECODER_FILE",
    "DECODER_INPUT",
    "DECODER_META",
    "DECODER_OUTPUT",
    "FORMAT_VERSION",
    "POOLINGS",
    "INPUT_NAME",
    "INT8_FILE",
    "LAYER_TOKENS",
    "LEGACY_VIT_OUTPUTS",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "NAME_PATTERN",
    "READABLE_VERSIONS",
    "RESNET_OUTPUTS",
    "VIT_OUTPUTS",
    "ArtifactError",
    "EmbeddingTransformInfo",
    "EvalTransform",
    "FileEntry",
    "Manifest",
    "ParityCheck",
    "Provenance",
    "Variant",
    "load_manifest",
    "sha256_file",
    "write_manifest",
]
