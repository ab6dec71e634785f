"""File helpers both sides share: sha256, atomic writes and atomic folder publishing.

Every write here is temp file (or folder) beside the target, fsync, rename over the target, fsync
of the parent folder: after a crash a reader finds the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Exports are staged in this hidden sub-folder of the models folder: same filesystem (the final
# move is a rename), and a server scanning for <dir>/manifest.json never sees a staged copy.
STAGING_DIR = ".staging"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: str | Path) -> None:
    """Make a rename durable (the directory entry lives in the directory's own blocks). Quietly
    skipped where a folder cannot be opened for it (e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write ``path`` through a binary file handle: a temp file beside it is flushed, fsynced and
    renamed over ``path`` when the block ends; on an exception the temp file is removed and
    ``path`` is left as it was. ``mode``: the permissions of the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide the file from a server run as another user
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def replace_atomic(src: str | Path, dst: str | Path) -> None:
    """Rename a finished (already written) file over ``dst`` durably: fsync it, rename, fsync
    the folder. Both must be on one filesystem (stage ``src`` beside ``dst``)."""
    with open(src, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Flush the files in ``tmp`` to disk, then rename ``tmp`` to ``final``.

    ``tmp`` must be on the same filesystem as ``final`` (e.g. in ``final.parent / STAGING_DIR``).
    An existing ``final`` is first renamed aside into ``tmp``'s parent and deleted after: each
    rename is atomic, so a reader finds the old complete folder, the new complete folder, or (for
    the moment between the two renames) none, never a partial one. If the second rename fails the
    old folder is put back. The server reads a model folder only when it starts, so this short
    absence is harmless.
    """
    for path in tmp.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = tmp.parent / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def remove_stale(parent: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Delete temp/old folders of ``name`` left in ``parent`` by a killed export (older than
    ``max_age_s``, so a concurrent export's live temp folder is spared)."""
    now = time.time()
    for pattern in (f"{name}.tmp-*", f"{name}.old-*"):
        for path in parent.glob(pattern):
            if path.is_dir() and now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
