"""Durable FAISS + SQLite index of embedded items. See ``service.index.store`` for the API."""

from service.index.errors import (
    DuplicateIdError,
    IndexModelMismatch,
    IndexStoreError,
    InvalidItemError,
)
from service.index.meta import read_info, rebuild_command
from service.index.store import Hit, IndexStore, Item

__all__ = [
    "DuplicateIdError",
    "Hit",
    "IndexModelMismatch",
    "IndexStore",
    "IndexStoreError",
    "InvalidItemError",
    "Item",
    "read_info",
    "rebuild_command",
]
