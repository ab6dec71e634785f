"""File, input and output names of an exported model folder, and the model-name pattern."""

from __future__ import annotations

# models/<name>/ holds these files.
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
DECODER_FILE = "decoder.onnx"
DECODER_META = "decoder.json"

# The backbone graph: one input, and the outputs per family (in this order).
INPUT_NAME = "pixel_values"
LAYER_TOKENS = "layer_tokens"
VIT_OUTPUTS = ("embedding", "patch_tokens", "attention", LAYER_TOKENS)
# ViT artifacts exported before ``layer_tokens`` existed; they still load.
LEGACY_VIT_OUTPUTS = VIT_OUTPUTS[:3]
RESNET_OUTPUTS = ("embedding",)

# The decoder graph (``decoder.onnx``): patch tokens as a grid in, an RGB image in [0, 1] out.
DECODER_INPUT = "patch_grid"
DECODER_OUTPUT = "image"

# A model's name is its folder name and the ``DINO_MODEL`` value: no path separators, no leading
# dot (hidden folders such as the exporter's staging area are never served).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
