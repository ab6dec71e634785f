"""``index.faiss``: a FAISS snapshot that carries its own identity and checksum.

Layout: ``MAGIC`` (8 bytes), header length (uint32 little-endian), a JSON header (sequence, model
sha256, dim, build parameters, payload sha256 and length), then ``faiss.serialize_index`` bytes.
Keeping the sequence inside the file (rather than in SQLite) means a crash between writing the file
and recording its sequence cannot leave the two disagreeing. Writes are atomic: temp file, fsync,
``os.replace``, fsync of the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import numpy as np

from artifact.files import atomic_write
from service.index.ann import AnnIndex, AnnParams

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "index.faiss"
MAGIC = b"DINOIDX1"
_LEN = struct.Struct("<I")


class SnapshotError(ValueError):
    """The snapshot file is missing, truncated, corrupt or of another format."""


def write_snapshot(path: Path, header: dict, payload: np.ndarray) -> None:
    data = memoryview(np.ascontiguousarray(payload, dtype=np.uint8)).cast("B")
    header = {
        **header,
        "payload_bytes": len(data),
        "payload_sha256": hashlib.sha256(data).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True).encode()
    with atomic_write(path) as fh:
        fh.write(MAGIC + _LEN.pack(len(head)) + head)
        fh.write(data)


def read_snapshot(path: Path) -> tuple[dict, np.ndarray]:
    """(header, payload) after checking magic, lengths and checksum; SnapshotError otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path} does not exist") from exc
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + _LEN.size:
        raise SnapshotError(f"{path} is not an index snapshot (bad magic)")
    (head_len,) = _LEN.unpack_from(raw, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(raw[start : start + head_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path} has an unreadable header: {exc}") from exc
    if not isinstance(header, dict):
        raise SnapshotError(f"{path} has an unreadable header")
    payload = memoryview(raw)[start + head_len :]
    if len(payload) != header.get("payload_bytes"):
        raise SnapshotError(
            f"{path} is truncated ({len(payload)} of {header.get('payload_bytes')})"
        )
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise SnapshotError(f"{path} fails its checksum")
    return header, np.frombuffer(payload, dtype=np.uint8)


def usable_snapshot(
    path: Path, meta: dict, dim: int, params: AnnParams
) -> tuple[AnnIndex | None, int, float | None, int]:
    """(index, sequence, written at, tombstones) from the snapshot at ``path`` when it belongs to
    this model, build and database; ``(None, -1, None, 0)`` (and a warning) when it does not, so
    the caller rebuilds from SQLite."""
    try:
        header, payload = read_snapshot(path)
        want = {"model_sha256": meta["model_sha256"], "dim": dim, "build": params.build_key()}
        got = {key: header.get(key) for key in want}
        if got != want:
            raise SnapshotError(f"it was built with {got}, now {want}")
        seq = int(header["seq"])
        if seq >= int(meta["next_row"]):
            raise SnapshotError(f"its sequence {seq} is ahead of the database")
        ann = AnnIndex.deserialize(dim, params, payload)
        return ann, seq, float(header["written_at"]), int(header.get("tombstones", 0))
    except (SnapshotError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("index snapshot %s not usable (%s); rebuilding from SQLite", path, exc)
        return None, -1, None, 0
