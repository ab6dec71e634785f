"""Input checks for items: ids, metadata, vectors, thumbnails. Each failure says what to change."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from service.index.errors import DuplicateIdError, InvalidItemError

MAX_ID_LEN = 128
MAX_METADATA_BYTES = 16 * 1024
# Deeper metadata was stored, then broke every response that includes it (GET /items/{id}, the
# gallery's GET /items) with a 500: pydantic stops serialising at ~255 levels, json at ~1000.
MAX_METADATA_DEPTH = 32
MAX_THUMBNAIL_BYTES = 256 * 1024
MAX_SOURCE_LEN = 4096


def check_k(k: object) -> int:
    """How many neighbours a search asks for: a positive integer (bool is not one)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidItemError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_id(item_id: object) -> str:
    """An external id: 1..128 printable characters, no '/' (ids appear in URL paths)."""
    if not isinstance(item_id, str):
        raise InvalidItemError(f"id must be a string, got {type(item_id).__name__}")
    if not item_id or len(item_id) > MAX_ID_LEN:
        raise InvalidItemError(f"id must have 1 to {MAX_ID_LEN} characters, got {len(item_id)}")
    if not item_id.isprintable():
        raise InvalidItemError(f"id {item_id!r} has non-printable characters")
    if "/" in item_id:
        raise InvalidItemError(f"id {item_id!r} contains '/', which cannot appear in a URL path")
    if item_id in (".", ".."):
        raise InvalidItemError(f"id {item_id!r} is not allowed: it is a path step in URLs")
    if item_id != item_id.strip():
        raise InvalidItemError(f"id {item_id!r} has leading or trailing spaces")
    return item_id


def check_ids(ids: Sequence[str] | None, n: int) -> list[str]:
    """Validate given ids (or make uuid4 hex ones); refuse repeats within the batch."""
    if ids is None:
        return [uuid.uuid4().hex for _ in range(n)]
    ids = list(ids)
    if len(ids) != n:
        raise InvalidItemError(f"got {len(ids)} ids for {n} vectors")
    checked = [check_id(i) for i in ids]
    seen: set[str] = set()
    repeated = [i for i in checked if i in seen or seen.add(i)]
    if repeated:
        raise DuplicateIdError(sorted(set(repeated)))
    return checked


def metadata_json(metadata: object) -> str:
    """Serialise one item's metadata: a JSON object (or None, stored as {}) under the size limit."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise InvalidItemError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    if nesting_depth(metadata) > MAX_METADATA_DEPTH:
        raise InvalidItemError(
            f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep; flatten it"
        )
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidItemError(f"metadata is not JSON-serialisable: {exc}") from exc
    size = len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise InvalidItemError(
            f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES} bytes"
        )
    return text


def nesting_depth(value: object) -> int:
    """Levels of dicts and lists (without recursion, so any depth can be measured)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_METADATA_DEPTH:  # deep enough to refuse: stop walking
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def per_item(values: Sequence | None, n: int, what: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise InvalidItemError(f"got {len(values)} {what} for {n} vectors")
    return values


def check_source(source: object, root: object = None) -> tuple[str | None, str | None]:
    """(source, root) as stored. With a root (set by ``build`` only), the source is a relative
    path inside it; without one, the source is only a name and is never opened."""
    if source is None or source == "":
        if root is not None:
            raise InvalidItemError("a source root needs a source")
        return None, None
    if not isinstance(source, str) or len(source) > MAX_SOURCE_LEN or "\0" in source:
        raise InvalidItemError(f"source must be a string of at most {MAX_SOURCE_LEN} characters")
    if root is None:
        return source, None
    if not isinstance(root, str) or not PurePosixPath(root).is_absolute():
        raise InvalidItemError(f"source root must be an absolute path, got {root!r}")
    rel = PurePosixPath(source)
    if rel.is_absolute() or ".." in rel.parts or rel.as_posix() != source:
        raise InvalidItemError(f"source {source!r} must be a plain path relative to its root")
    return source, root


def shown_source(source: str | None, root: str | None) -> str | None:
    """What answers show of a source: the path below its root, else only the last name (never
    a server path: old files stored absolute paths, and uploads a client's file name)."""
    if source is None or root is not None:
        return source
    return PurePosixPath(source.replace("\\", "/")).name or None


def check_thumbnail(thumbnail: object) -> bytes | None:
    if thumbnail is None:
        return None
    if not isinstance(thumbnail, bytes | bytearray | memoryview):
        raise InvalidItemError(f"thumbnail must be bytes, got {type(thumbnail).__name__}")
    if len(thumbnail) > MAX_THUMBNAIL_BYTES:
        raise InvalidItemError(
            f"thumbnail is {len(thumbnail)} bytes; the limit is {MAX_THUMBNAIL_BYTES}"
        )
    return bytes(thumbnail)


def as_unit_rows(vectors: object, dim: int, what: str = "vectors") -> np.ndarray:
    """[n, dim] or [dim] -> contiguous float32 [n, dim], L2-normalised (scores are cosines)."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidItemError(f"{what} must have shape [n, {dim}] or [{dim}], got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidItemError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms <= 1e-12).any():
        raise InvalidItemError(f"{what} contain an all-zero row, which has no direction")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)
