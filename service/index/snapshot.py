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
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

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
    # A fresh name created with O_EXCL (mkstemp): a symlink planted beside the snapshot is never
    # opened, so its target cannot be overwritten.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + _LEN.pack(len(head)) + head)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry lives in the directory's own blocks)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
