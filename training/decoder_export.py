"""Export a trained ``PatchDecoder`` beside a served model: ``decoder.onnx`` + ``decoder.json``.

The files and fields are the artifact contract's (``artifact.decoder``): the graph takes
``patch_grid`` float32 ``[B, D, h, w]`` (dynamic B, h, w) and gives ``image`` ``[B, 3, h*p, w*p]``,
RGB in [0, 1]; ``decoder.json`` records the backbone's ``model.onnx`` sha256 so a server never
pairs a decoder with weights it was not trained on. The backbone's ``manifest.json`` is left as
it is.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from artifact import DECODER_FILE, DECODER_INPUT, DECODER_META, DECODER_OUTPUT, load_manifest
from artifact.decoder import DecoderMeta, DecoderParity
from artifact.files import replace_atomic, sha256_file, write_text_atomic
from training.decoder import PatchDecoder
from training.onnx_graph import OPSET, inference_copy, trace_to_onnx
from training.parity import ParityError
from training.provenance import git_commit

log = logging.getLogger(__name__)

MAX_PARITY_DIFF = 1e-4  # pixels in [0, 1]


def _write_onnx(decoder: PatchDecoder, path: Path, grid: int) -> None:
    sample = torch.randn(
        2, decoder.embed_dim, grid, grid, generator=torch.Generator().manual_seed(0)
    )
    axes = {
        DECODER_INPUT: {0: "batch", 2: "grid_h", 3: "grid_w"},
        DECODER_OUTPUT: {0: "batch", 2: "height", 3: "width"},
    }
    trace_to_onnx(decoder, sample, path, DECODER_INPUT, (DECODER_OUTPUT,), axes)
    onnx.checker.check_model(str(path))


def decoder_parity(decoder: PatchDecoder, path: Path) -> list[DecoderParity]:
    """ORT vs PyTorch at a few grids (square and not, batch 1 and 2); raises ``ParityError``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    checks = []
    for b, h, w in ((1, 4, 4), (2, 3, 5), (1, 7, 6)):
        grid = torch.randn(b, decoder.embed_dim, h, w, generator=gen)
        with torch.no_grad():
            want = decoder(grid).numpy()
        (got,) = session.run([DECODER_OUTPUT], {DECODER_INPUT: grid.numpy()})
        diff = float(np.abs(got - want).max())
        checks.append(DecoderParity(shape=(b, decoder.embed_dim, h, w), max_abs_diff=diff))
        if got.shape != want.shape or diff > MAX_PARITY_DIFF:
            raise ParityError(
                f"decoder ONNX differs from PyTorch at grid {h}x{w}: shapes {got.shape} vs "
                f"{want.shape}, max abs diff {diff:.2e} (limit {MAX_PARITY_DIFF})"
            )
    return checks


def export_decoder(decoder: PatchDecoder, model_dir: str | Path, training: dict) -> Path:
    """Write ``decoder.onnx`` and ``decoder.json`` into ``model_dir`` (an exported model whose
    patch size and width the decoder must match); return the json's path. Files are written to
    temp names and renamed, ``decoder.json`` last, so a reader never sees a half-written pair."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir, verify_files=True)
    if manifest.family != "vit" or manifest.patch_size != decoder.patch_size:
        raise ValueError(
            f"{model_dir} serves {manifest.arch} (patch {manifest.patch_size}); the decoder was "
            f"built for patch {decoder.patch_size} tokens"
        )
    if manifest.embed_dim != decoder.embed_dim:
        raise ValueError(
            f"{model_dir} has embed_dim {manifest.embed_dim}; the decoder takes {decoder.embed_dim}"
        )
    model = inference_copy(decoder)
    fd, tmp_name = tempfile.mkstemp(prefix=".decoder.", suffix=".onnx", dir=model_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        t0 = time.perf_counter()
        _write_onnx(model, tmp, grid=4)
        parity = decoder_parity(model, tmp)
        meta = DecoderMeta.model_validate(
            {
                "sha256": sha256_file(tmp),
                "bytes": tmp.stat().st_size,
                "backbone": manifest.name,
                "backbone_sha256": manifest.model_sha256,
                "patch_size": decoder.patch_size,
                "embed_dim": decoder.embed_dim,
                "decoder": decoder.config,
                "opset": OPSET,
                "parity": parity,
                "training": training,
                "git_commit": git_commit(),
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        os.chmod(tmp, 0o644)
        replace_atomic(tmp, model_dir / DECODER_FILE)
        # decoder.json last: it names the sha256 of the file now in place.
        write_text_atomic(model_dir / DECODER_META, meta.model_dump_json(indent=2) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info(
        "decoder: %s (%.1f MB, parity max diff %.1e) in %.1f s",
        model_dir / DECODER_FILE,
        meta.bytes / 1e6,
        max(c.max_abs_diff for c in parity),
        time.perf_counter() - t0,
    )
    return model_dir / DECODER_META
