"""Publish a folder under its final name without ever exposing a half-written one."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

STAGING_DIR = ".staging"


def publish_dir(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk, then rename it to ``final`` (replacing any existing folder).

    ``tmp`` must be on the same filesystem as ``final`` (e.g. in ``final.parent / STAGING_DIR``);
    an old folder moved aside goes to ``tmp``'s parent before it is deleted.
    """
    _fsync_tree(tmp)
    _swap_in(tmp, final)


def remove_stale(parent: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Delete temp/old folders of ``name`` left by a killed export (older than ``max_age_s``,
    so a concurrent export's live temp folder is spared)."""
    now = time.time()
    for pattern in (f"{name}.tmp-*", f"{name}.old-*"):
        for path in parent.glob(pattern):
            if path.is_dir() and now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk so the rename never publishes empty files after a crash."""
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where the
    kernel, libc or filesystem lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _swap_in(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is swapped out and deleted after.

    Where the kernel supports it the swap is one atomic exchange, so readers always find a
    complete folder. Elsewhere it is two renames: for a moment the name is absent (a reader then
    finds no model rather than a partial one), and if the second rename fails the old folder is
    put back.
    """
    if not final.exists():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = tmp.parent / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
