"""One process per data dir: the FAISS copy in memory must see every SQLite write.

A second writer (say ``python -m service.index build`` while the server runs) would add rows the
server's FAISS never hears of, and the server's next snapshot would claim to cover them. ``flock``
is released by the kernel when the holder dies, so a ``kill -9`` leaves no stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from service.index.errors import IndexStoreError

LOCK_FILE = ".lock"


class DirLock:
    def __init__(self, data_dir: Path):
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise IndexStoreError(
                f"the index in {data_dir} is in use by another process (pid {holder}); stop it "
                "(e.g. the server) first, or point DINO_DATA_DIR / --data-dir elsewhere"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
