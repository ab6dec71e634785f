"""``python -m service.index rebuild``: make a data dir fit the current model.

Same model and embedding transform: only the FAISS index is rebuilt from the vectors in SQLite
(e.g. after changing the index type). Another model (or transform): every item is re-embedded
from its source file into a fresh data dir beside the old one (ids, metadata and thumbnails
kept); only when all of that succeeded are the folders swapped, and the old one is kept as
``<dir>.old-<time>`` until you delete it.

The data dir's lock is held from the first read to the swap, so a running server refuses the
rebuild rather than losing writes. Only sources that ``build`` recorded with their root are
re-read, and only when their real path is still inside that root: a client's file name is never
opened. ``legacy_roots`` lets files written before roots were recorded (absolute sources) be
re-read too, when they lie inside one of those folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from artifact.files import fsync_dir
from service.index.db import DB_FILE, ItemDB
from service.index.errors import IndexStoreError
from service.index.lock import DirLock
from service.index.meta import NO_TRANSFORM, read_info
from service.index.snapshot import SNAPSHOT_FILE
from service.index.store import IndexStore

log = logging.getLogger(__name__)

Embed = Callable[[list[Path]], tuple[list[int], np.ndarray, list[bytes], list]]


def source_file(
    source: str | None, root: str | None, legacy_roots: Sequence[Path] = ()
) -> tuple[Path, str, str] | None:
    """(file to read, source, root to record) when an item may be re-read, else None."""
    if source is None:
        return None
    if root is None:  # an upload's name, or an absolute path from before roots were recorded
        if not legacy_roots or not PurePosixPath(source).is_absolute():
            return None
        real = Path(source).resolve()
        bases = [r.resolve() for r in legacy_roots]
        base = next((b for b in bases if real.is_relative_to(b)), None)
        if base is None:
            return None
        source, root = real.relative_to(base).as_posix(), str(base)
    real_root = Path(root).resolve()
    if ".." in PurePosixPath(source).parts or PurePosixPath(source).is_absolute():
        return None
    real = (real_root / source).resolve()
    if not real.is_relative_to(real_root) or not real.is_file():
        return None  # moved, deleted, or now a link out of its root
    return real, source, root


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
    legacy_roots: Sequence[Path] = (),
    lock: DirLock | None = None,
) -> dict:
    """Rebuild ``data_dir`` for the given model; returns a small report."""
    lock = lock or DirLock(data_dir)
    try:
        info = read_info(data_dir)
        same = (info["model_sha256"], info["dim"], info["embedding_transform"])
        if same == (model_sha256, dim, transform):
            (data_dir / SNAPSHOT_FILE).unlink(missing_ok=True)
            with IndexStore.open(
                data_dir, model_sha256, dim, index_type, model_name=model_name,
                transform=transform, progress=progress, lock=lock,
            ) as store:  # fmt: skip
                count = len(store)
            log.info("same model: rebuilt the %s FAISS index of %d items", index_type, count)
            return {"re_embedded": 0, "rebuilt": count, "dropped": []}
        return _re_embed(
            data_dir, model_sha256, dim, embed, model_name, transform, index_type, batch_size,
            skip_missing, progress, legacy_roots,
        )  # fmt: skip
    finally:
        lock.release()


def _re_embed(
    data_dir, model_sha256, dim, embed, model_name, transform, index_type, batch_size,
    skip_missing, progress, legacy_roots,
) -> dict:  # fmt: skip
    db = ItemDB(data_dir / DB_FILE)
    try:
        items = list(db.iter_items())
    finally:
        db.close()
    todo, missing = _readable_items(items, legacy_roots)
    _refuse_or_drop(missing, skip_missing, "have no source file that rebuild may read")

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
        dropped += _embed_into(store, todo, embed, batch_size, skip_missing, progress)
    if len(dropped) > len(missing) and not skip_missing:
        shutil.rmtree(staging, ignore_errors=True)
        _refuse_or_drop(dropped[len(missing) :], False, "could not be decoded")
    old = _swap(data_dir, staging)
    done = len(items) - len(dropped)
    log.info("re-embedded %d items; the previous index is kept in %s (delete it when satisfied)",
             done, old)  # fmt: skip
    return {"re_embedded": done, "dropped": dropped, "previous": str(old)}


def _readable_items(items: list, legacy_roots) -> tuple[list, list[str]]:
    """Split stored items into (those whose source file rebuild may read, ids of the rest)."""
    todo, missing = [], []
    for iid, meta, source, root, thumb in items:
        found = source_file(source, root, legacy_roots)
        if found is None:
            missing.append(iid)
        else:
            todo.append((iid, meta, thumb, *found))
    return todo, missing


def _embed_into(
    store, todo: list, embed, batch_size: int, skip_missing: bool, progress: bool
) -> list:
    """Embed ``todo`` batch by batch into ``store``; returns the ids that could not be decoded.

    Without ``skip_missing`` it stops at the first batch with a failure: the caller refuses.
    """
    dropped = []
    bar = tqdm(total=len(todo), unit="img", desc="re-embedding", disable=not progress)
    with bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            kept, vectors, _, failed = embed([t[3] for t in batch])
            dropped += [batch[i][0] for i in sorted(set(range(len(batch))) - set(kept))]
            if failed and not skip_missing:
                break
            chosen = [batch[i] for i in kept]
            store.add(
                vectors,
                ids=[c[0] for c in chosen],
                metadata=[json.loads(c[1]) for c in chosen],
                sources=[c[4] for c in chosen],
                source_roots=[c[5] for c in chosen],
                thumbnails=[c[2] for c in chosen],
            )
            bar.update(len(batch))
    return dropped


def _swap(data_dir: Path, staging: Path) -> Path:
    """Put ``staging`` in place of ``data_dir`` (still locked by us); returns the old one."""
    old = data_dir.with_name(f"{data_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(data_dir, old)
    try:
        os.replace(staging, data_dir)
    except OSError as exc:  # something created data_dir in between: leave both for a person
        raise IndexStoreError(
            f"could not move the rebuilt index {staging} to {data_dir} ({exc}); the previous "
            f"index is in {old}"
        ) from exc
    fsync_dir(data_dir.parent)
    return old


def _refuse_or_drop(ids: list[str], skip: bool, why: str) -> None:
    if not ids:
        return
    shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
    if not skip:
        raise IndexStoreError(
            f"{len(ids)} item(s) {why} ({shown}), so they cannot be re-embedded. Items added "
            "over HTTP keep no file; items built by `build` are re-read only inside the "
            "--images folder they came from (for indexes made before roots were recorded, "
            "pass --legacy-root FOLDER). Restore the files, or pass --skip-missing to drop "
            "those items from the rebuilt index."
        )
    log.warning("dropping %d item(s) that %s: %s", len(ids), why, shown)
