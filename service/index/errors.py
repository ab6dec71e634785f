"""Errors raised by the index. The server maps them to HTTP codes (see the store's docstring)."""

from __future__ import annotations


class IndexStoreError(RuntimeError):
    """The index on disk cannot be used as asked."""


class IndexModelMismatch(IndexStoreError):
    """The data dir holds vectors of another model (or another dimension)."""


class InvalidItemError(ValueError):
    """Bad input to add(): id, metadata, vector or thumbnail (HTTP 422)."""


class DuplicateIdError(InvalidItemError):
    """An id that is already indexed, or repeated within one add() (HTTP 409)."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        super().__init__(f"{len(ids)} id(s) already in the index: {shown}; delete them first")
