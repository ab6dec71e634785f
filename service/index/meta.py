"""What a data dir was built with (SQLite ``meta``), checked before any vector is touched."""

from __future__ import annotations

import logging
from pathlib import Path

from service.index.db import DB_FILE, SCHEMA_VERSION, ItemDB, utc_now
from service.index.errors import IndexModelMismatch, IndexStoreError, refuse_other_model
from service.index.snapshot import SNAPSHOT_FILE, SnapshotError, read_snapshot

log = logging.getLogger(__name__)


def rebuild_command(data_dir: Path) -> str:
    return f"python -m service.index rebuild --data-dir {data_dir}"


# An index made before embedding transforms existed holds plainly L2-normalised vectors.
NO_TRANSFORM = "none"


def check_meta(
    db: ItemDB,
    data_dir: Path,
    sha: str,
    dim: int,
    index_type: str,
    name: str | None,
    transform: str = NO_TRANSFORM,
) -> dict[str, str]:
    """Record the model (and its embedding transform) on first use; afterwards refuse another
    model's, dimension's or transform's index."""
    meta = db.meta()
    if "model_sha256" not in meta:
        db.set_meta(
            schema_version=SCHEMA_VERSION,
            model_sha256=sha,
            dim=dim,
            index_type=index_type,
            model_name=name or "",
            next_row=0,
            created_at=utc_now(),
            embedding_transform=transform,
        )
        return db.meta()
    refuse_other_model(
        str(data_dir),
        meta,
        sha,
        dim,
        name,
        f"Re-embed the stored items with the current model: `{rebuild_command(data_dir)}` "
        f"(with --models-dir/--model as for the server), or move {data_dir} away to start empty.",
    )
    recorded = meta.get("embedding_transform", NO_TRANSFORM)
    if recorded != transform:
        raise IndexModelMismatch(
            f"the index in {data_dir} holds vectors made with embedding transform {recorded!r}, "
            f"but the model in use applies {transform!r}; their scores cannot be compared. "
            f"Re-embed the stored items: `{rebuild_command(data_dir)}` (with --models-dir/--model "
            f"as for the server), or move {data_dir} away to start empty."
        )
    if meta.get("index_type") != index_type:
        log.info(
            "index type %s -> %s: rebuilding the FAISS index", meta.get("index_type"), index_type
        )
        db.set_meta(index_type=index_type)
    if meta.get("model_name", "") != (name or meta.get("model_name", "")):
        db.set_meta(model_name=name)  # same weights under a new name
    return db.meta()


def read_info(data_dir: Path | str) -> dict:
    """Describe a data dir without loading FAISS or knowing the model (for `stats`)."""
    data_dir = Path(data_dir)
    if not (data_dir / DB_FILE).is_file():
        raise IndexStoreError(f"no index in {data_dir} (no {DB_FILE}); build one first")
    db = ItemDB(data_dir / DB_FILE, migrate=False)
    try:
        meta, count = db.meta(), db.count()
    finally:
        db.close()
    info: dict = {
        "data_dir": str(data_dir),
        "count": count,
        "dim": int(meta["dim"]) if "dim" in meta else None,
        "type": meta.get("index_type"),
        "model_sha256": meta.get("model_sha256"),
        "model_name": meta.get("model_name") or None,
        "embedding_transform": meta.get("embedding_transform", NO_TRANSFORM)
        if "model_sha256" in meta
        else None,
        "created_at": meta.get("created_at"),
        "rows_assigned": int(meta.get("next_row", 0)),
    }
    try:
        header, _ = read_snapshot(data_dir / SNAPSHOT_FILE)
        info["snapshot"] = {k: header.get(k) for k in ("seq", "count", "written_at", "build")}
    except SnapshotError as exc:
        info["snapshot"] = f"none usable ({exc})"
    return info
