"""The index API the server relies on, met by both backends.

* ``IndexStore`` (``service.index.store``): embedded FAISS + SQLite in ``DINO_DATA_DIR``, one
  process per data dir.
* ``PgStore`` (``service.index.postgres``): PostgreSQL + pgvector at ``DINO_INDEX_URL``, shared by
  any number of server processes.

Errors are the same on both: ``DuplicateIdError`` (409), ``InvalidItemError`` (422),
``IndexModelMismatch`` at open, ``IndexStoreError`` (503; ``IndexUnavailable`` when a database
cannot be reached).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from service.index.store import Hit, Item


@runtime_checkable
class IndexBackend(Protocol):
    dim: int
    model_sha256: str

    def add(
        self,
        vectors: np.ndarray,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict | None] | None = None,
        sources: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        source_roots: Sequence[str | None] | None = None,
    ) -> list[str]: ...

    def delete(self, item_id: str) -> bool: ...

    def get(self, item_id: str) -> Item | None: ...

    def list_items(self, offset: int = 0, limit: int = 50) -> tuple[list[Item], int]: ...

    def thumbnail(self, item_id: str) -> bytes | None: ...

    def vector(self, item_id: str) -> np.ndarray | None: ...

    def existing(self, ids: Iterable[str]) -> set[str]: ...

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        exclude_ids: Iterable[str] | None = None,
        filter: dict | None = None,
    ) -> list[list[Hit]]: ...

    def similar(
        self, item_id: str, k: int = 10, filter: dict | None = None
    ) -> list[Hit] | None: ...

    def stats(self) -> dict: ...

    def snapshot(self) -> None: ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...

    def __enter__(self) -> IndexBackend: ...

    def __exit__(self, *exc: object) -> None: ...
