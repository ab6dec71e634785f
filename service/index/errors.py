"""Errors raised by the index. The server maps them to HTTP codes (see the store's docstring)."""

from __future__ import annotations


class IndexStoreError(RuntimeError):
    """The index on disk cannot be used as asked."""


class IndexModelMismatch(IndexStoreError):
    """The data dir holds vectors of another model (or another dimension)."""


def refuse_other_model(
    where: str, meta: dict, sha: str, dim: int, name: str | None, remedy: str
) -> None:
    """Raise IndexModelMismatch if the index's vectors come from another model than the one in
    use; ``remedy`` ends the message with what to do, which differs by backend."""
    if meta["model_sha256"] == sha and int(meta["dim"]) == dim:
        return
    built_by = repr(meta["model_name"]) if meta.get("model_name") else "an unnamed model"
    now = f"{name!r} " if name else ""
    raise IndexModelMismatch(
        f"the index in {where} was built by model {built_by} (sha256 "
        f"{meta['model_sha256'][:12]}, dim {meta['dim']}), but the model in use is "
        f"{now}(sha256 {sha[:12]}, dim {dim}); their vectors cannot be compared. {remedy}"
    )


class InvalidItemError(ValueError):
    """Bad input to add(): id, metadata, vector or thumbnail (HTTP 422)."""


class DuplicateIdError(InvalidItemError):
    """An id that is already indexed, or repeated within one add() (HTTP 409)."""

    def __init__(self, ids: list[str]):
        self.ids = ids
        shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        super().__init__(f"{len(ids)} id(s) already in the index: {shown}; delete them first")
