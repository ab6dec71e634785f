"""Reading, writing and strictly loading checkpoints: ours and the official DINO files.

Loading is strict on purpose: a backbone that silently kept half its random weights would give
plausible-looking but meaningless features.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from artifact.cli import run_cli
from artifact.files import atomic_write

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit the model it is loaded into."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over it.

    A crash mid-write leaves the previous checkpoint intact instead of a truncated one.
    """
    with atomic_write(path) as fh:
        torch.save(obj, fh)


def _data_globals() -> list[Any]:
    """The only non-torch globals a checkpoint may name: data types whose reconstruction runs no
    code of the file's choosing. argparse args (official DINO checkpoints), paths, numpy arrays,
    dtypes and scalars (numpy RNG states). Never functions or classes with behaviour, and never
    anything from this project's own packages: a file that names ``training.quickstart.run_step``
    would otherwise call it."""
    np_core = getattr(np, "_core", None) or np.core
    found = [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
        np.ndarray,
        np.dtype,
        np_core.multiarray._reconstruct,  # numpy's own array constructor for pickles
        np_core.multiarray.scalar,
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dtypes.__all__]
    return found


def read_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """Load a checkpoint onto the CPU as a dict of tensors and plain data.

    Uses ``weights_only=True`` with an allow-list of data types only (see ``_data_globals``), so
    a downloaded file cannot run code while it loads; anything else is refused with a
    ``CheckpointError`` naming the global. ``trusted=True`` (the Python API only, never a CLI
    default) falls back to a full unpickle: for a file you made yourself, e.g. to convert it
    with ``python -m training.checkpoints convert``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(_data_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        globals_named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if not globals_named:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc
        if not trusted:
            raise CheckpointError(
                f"checkpoint {path} names the Python global {', '.join(globals_named)}, which is "
                f"not a tensor or plain data; refusing to load it (unpickling it could run "
                f"code). If you made this file yourself, convert it to plain data with "
                f"`python -m training.checkpoints convert --trust-source {path} OUT.pth`"
            ) from exc
        log.warning("loading %s with weights_only=False (trusted source)", path)
        obj = _load_untrusted(path)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (a state dict or "
            f"a training checkpoint)"
        )
    return dict(obj)


def _load_untrusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def extract_backbone_state_dict(obj: Mapping, which: str = "teacher") -> dict[str, Tensor]:
    """The backbone's weights from any supported layout, keys without wrapper prefixes.

    Accepts a backbone-only state dict (official ``dino_*_pretrain.pth`` or ours), a training
    checkpoint with ``teacher``/``student`` entries (official or ours; ``module.``/``backbone.``
    prefixes stripped, ``head.*`` dropped) and a dict wrapping one under ``state_dict``/``model``.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict, got {type(obj).__name__}")
    if "teacher" in obj or "student" in obj:
        if which not in obj:
            raise CheckpointError(
                f"checkpoint has no {which!r} entry (it has {sorted(map(str, obj))[:10]}); "
                f"choose which={'student' if which == 'teacher' else 'teacher'!r}"
            )
        return extract_backbone_state_dict(obj[which], which)
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return extract_backbone_state_dict(obj[wrapper], which)

    stripped: dict[str, Any] = {}
    for key, value in obj.items():
        stripped[_strip(str(key))] = value
    if any(k.startswith("backbone.") for k in stripped):
        # The wrapper's own iBOT mask token is training-only, like the head.
        others = [
            k for k in stripped if not k.startswith(("backbone.", "head.")) and k != "mask_token"
        ]
        if others:
            log.warning("ignoring %d non-backbone keys, e.g. %s", len(others), others[:3])
        stripped = {
            k[len("backbone.") :]: v for k, v in stripped.items() if k.startswith("backbone.")
        }
    bad = [k for k, v in stripped.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"not a state dict: entries {_listing(bad)} are not tensors. Expected a backbone "
            f"state dict or a checkpoint with 'teacher'/'student' entries"
        )
    if not stripped:
        raise CheckpointError("the checkpoint holds no backbone weights")
    return stripped


def _listing(keys: list[str], sort: bool = True) -> str:
    keys = sorted(keys) if sort else list(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


_FAMILY_WIDTHS = {384: "s", 768: "b", 1024: "l", 1536: "g"}


def _describe_family(sd: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """DINOv2 / DINOv3 backbones, told apart by their layerscale, RoPE and ConvNeXt keys."""
    if "downsample_layers.0.0.weight" in sd:
        width = int(sd["norm.weight"].shape[0]) if "norm.weight" in sd else "?"
        return f"a DINOv3 ConvNeXt (final width {width})", ""
    if "blocks.0.ls1.gamma" not in sd or "patch_embed.proj.weight" not in sd:
        return None
    dim = int(sd["patch_embed.proj.weight"].shape[0])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    size = _FAMILY_WIDTHS.get(dim, "?")
    if "rope_embed.periods" in sd:
        plus = "plus" if "blocks.0.mlp.w1.weight" in sd else ""
        arch = f"dinov3_vit{size}16{plus}"
        return f"a DINOv3 ViT ({arch}-shaped, width {dim}, depth {depth})", f"--arch {arch}"
    arch = f"dinov2_vit{size}14{'_reg' if 'register_tokens' in sd else ''}"
    return f"a DINOv2 ViT ({arch}-shaped, width {dim}, depth {depth})", f"--arch {arch}"


def describe_state_dict(sd: Mapping[str, Tensor]) -> tuple[str, str]:
    """Best guess of the architecture a backbone state dict belongs to, and the CLI flags that
    build it: ``("vit_small, patch 16, ...", "--arch vit_small --patch-size 16")``."""
    family = _describe_family(sd)
    if family is not None:
        return family
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        arch = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}.get(dim)
        name = arch or f"a ViT with embed_dim {dim}"
        text = f"{name}, patch {patch}, depth {depth}"
        if "pos_embed" in sd:
            side = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
            text += f", trained grid {side}x{side} (img_size {side * patch})"
        return text, f"--arch {arch} --patch-size {patch}" if arch else ""
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        arch = "resnet50" if "layer1.0.conv3.weight" in sd else "resnet18"
        return arch, f"--arch {arch}"
    return "an unknown architecture", ""


def load_backbone_weights(
    backbone: nn.Module, source: str | Path | Mapping, which: str = "teacher"
) -> None:
    """Load backbone weights strictly from a file or a dict; any mismatch raises
    ``CheckpointError`` listing missing keys, unexpected keys and shape differences."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    sd = extract_backbone_state_dict(obj, which)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        where = f" from {source}" if isinstance(source, (str, Path)) else ""
        parts = [f"checkpoint{where} does not fit the {type(backbone).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_listing(shapes, sort=False)}")
        ckpt_arch, flags = describe_state_dict(sd)
        model_arch, _ = describe_state_dict(expected)
        parts.append(f"the checkpoint holds {ckpt_arch}; the model is {model_arch}")
        if flags:
            parts.append(f"build the matching model (e.g. pass {flags})")
        raise CheckpointError("; ".join(parts))
    backbone.load_state_dict(sd, strict=True)


_PLAIN = (str, int, float, bool, complex, bytes, type(None), Tensor, np.ndarray, np.generic)


def to_plain_data(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with dataclasses turned into dicts and paths into strings, so that it loads with
    ``read_checkpoint``; raises ``CheckpointError`` naming the first other object found."""
    if isinstance(obj, (*_PLAIN, argparse.Namespace, torch.dtype, torch.Size)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain_data(dataclasses.asdict(obj), where)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: to_plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [to_plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else type(obj)(items)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise CheckpointError(f"{where} is a {kind}, which has no plain-data form; drop it first")


def convert(src: Path, dst: Path) -> None:
    """Rewrite a checkpoint you trust as plain data (a full unpickle of ``src`` runs its code)."""
    plain = to_plain_data(read_checkpoint(src, trusted=True))
    save_atomic(plain, dst)
    read_checkpoint(dst)  # proves the result loads without trust


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.checkpoints",
        description="Convert a checkpoint that holds Python objects into plain data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="rewrite SRC as tensors and plain data into DST")
    conv.add_argument("src", type=Path, help="the checkpoint to convert (it gets fully unpickled)")
    conv.add_argument("dst", type=Path, help="where to write the plain-data checkpoint")
    conv.add_argument(
        "--trust-source",
        action="store_true",
        help="required: you made SRC yourself or trust whoever did (loading it may run code)",
    )
    args = parser.parse_args(argv)
    if not args.trust_source:
        parser.error(
            "convert unpickles SRC in full, which runs any code in it: pass --trust-source"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert(args.src, args.dst)  # a CheckpointError is a ValueError: run_cli exits 2
    print(f"wrote {args.dst}: it loads without trust")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, argv, prog="python -m training.checkpoints")


if __name__ == "__main__":
    sys.exit(main())
