"""``python -m service.index rebuild``: make a data dir fit the current model.

Same model and embedding transform: only the FAISS index is rebuilt from the vectors in SQLite
(e.g. after changing the index type). Another model (or transform): every item is re-embedded from
its stored source file into a fresh data dir beside the old one (ids, metadata and thumbnails
kept); only when all of that succeeded
are the folders swapped, and the old one is kept as ``<dir>.old-<time>`` until you delete it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.index.db import DB_FILE, ItemDB
from service.index.errors import IndexStoreError
from service.index.meta import NO_TRANSFORM, read_info
from service.index.snapshot import SNAPSHOT_FILE, fsync_dir
from service.index.store import IndexStore

log = logging.getLogger(__name__)

Embed = Callable[[list[Path]], tuple[list[int], np.ndarray, list[bytes], list]]


def rebuild(
    data_dir: Path,
    model_sha256: str,
    dim: int,
    embed: Embed,
    *,
    model_name: str | None = None,
    transform: str = NO_TRANSFORM,
    index_type: str = "flat",
    batch_size: int = 32,
    skip_missing: bool = False,
    progress: bool = True,
) -> dict:
    """Rebuild ``data_dir`` for the given model; returns a small report."""
    info = read_info(data_dir)
    same = (info["model_sha256"], info["dim"], info["embedding_transform"])
    if same == (model_sha256, dim, transform):
        (data_dir / SNAPSHOT_FILE).unlink(missing_ok=True)
        with IndexStore.open(
            data_dir,
            model_sha256,
            dim,
            index_type,
            model_name=model_name,
            transform=transform,
            progress=progress,
        ) as store:
            count = len(store)
        log.info("same model: rebuilt the %s FAISS index of %d items", index_type, count)
        return {"re_embedded": 0, "rebuilt": count, "dropped": []}

    db = ItemDB(data_dir / DB_FILE)
    try:
        items = list(db.iter_items())
    finally:
        db.close()
    missing = [i for i, _, src, _, _ in items if not src or not Path(src).is_file()]
    _refuse_or_drop(missing, skip_missing, "have no readable source file")
    skipped = set(missing)
    todo = [it for it in items if it[0] not in skipped]

    staging = data_dir.with_name(data_dir.name + ".rebuilding")
    shutil.rmtree(staging, ignore_errors=True)  # a previous rebuild that died half-way
    dropped = list(missing)
    with IndexStore.open(
        staging,
        model_sha256,
        dim,
        index_type,
        model_name=model_name,
        transform=transform,
        progress=False,
    ) as store:
        bar = tqdm(total=len(todo), unit="img", desc="re-embedding", disable=not progress)
        with bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                kept, vectors, _, failed = embed([Path(src) for _, _, src, _, _ in batch])
                dropped += [batch[i][0] for i in sorted(set(range(len(batch))) - set(kept))]
                if failed and not skip_missing:
                    break
                chosen = [batch[i] for i in kept]
                store.add(
                    vectors,
                    ids=[c[0] for c in chosen],
                    metadata=[json.loads(c[1]) for c in chosen],
                    sources=[c[2] for c in chosen],
                    thumbnails=[c[3] for c in chosen],
                )
                bar.update(len(batch))
    if len(dropped) > len(missing) and not skip_missing:
        shutil.rmtree(staging, ignore_errors=True)
        _refuse_or_drop(dropped[len(missing) :], False, "could not be decoded")
    old = data_dir.with_name(f"{data_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(data_dir, old)
    os.replace(staging, data_dir)
    fsync_dir(data_dir.parent)
    done = len(items) - len(dropped)
    log.info("re-embedded %d items; the previous index is kept in %s (delete it when satisfied)",
             done, old)  # fmt: skip
    return {"re_embedded": done, "dropped": dropped, "previous": str(old)}


def _refuse_or_drop(ids: list[str], skip: bool, why: str) -> None:
    if not ids:
        return
    shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
    if not skip:
        raise IndexStoreError(
            f"{len(ids)} item(s) {why} ({shown}), so they cannot be re-embedded (items uploaded "
            "over HTTP keep only their file name). Restore the files, or pass --skip-missing to "
            "drop those items from the rebuilt index."
        )
    log.warning("dropping %d item(s) that %s: %s", len(ids), why, shown)
