"""One process per data dir: the FAISS copy in memory must see every SQLite write.

A second writer (say ``python -m service.index build`` while the server runs) would add rows the
server's FAISS never hears of, and the server's next snapshot would claim to cover them. ``flock``
is released by the kernel when the holder dies, so a ``kill -9`` leaves no stale lock behind.
The maintenance commands take the same lock before they read or change anything.

The lock file is opened with ``O_NOFOLLOW``: a symlink planted at its path is refused, not
followed (the pid written into the lock file would otherwise truncate the link's target).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from service.index.errors import IndexStoreError

LOCK_FILE = ".lock"


class DataDirBusy(IndexStoreError):
    """Another process holds the data dir's lock."""

    def __init__(self, data_dir: Path, holder: str):
        self.holder = holder
        super().__init__(
            f"the index in {data_dir} is in use by another process (pid {holder}); stop it "
            "(e.g. the server) first, or point DINO_DATA_DIR / --data-dir elsewhere"
        )


class DirLock:
    def __init__(self, data_dir: Path):
        self.path = data_dir / LOCK_FILE
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd: int | None = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IndexStoreError(
                    f"{self.path} is a symbolic link; refusing to follow it. Remove it (the "
                    "index recreates its lock file)"
                ) from None
            raise IndexStoreError(f"cannot open the lock file {self.path}: {exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise DataDirBusy(data_dir, holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
