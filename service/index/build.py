"""Embed a folder of images into the index (``python -m service.index build``), resumably.

Images go through the server's own decoding (``service.images``), preprocessing
(``service.preprocess``) and onnxruntime engine (``service.engine_onnxruntime``), so a built item's
vector is exactly what ``POST /items`` would store. Item ids are the paths relative to the folder,
with '/' written as ':' (ids appear in URL paths); a path that cannot be an id gets ``h:<sha256>``.
A second run skips every id already indexed, so an interrupted build resumes where it stopped.
Of two paths with one id ('a/b.jpg' and 'a:b.jpg') the one already indexed (else the first by
name) keeps it and the other fails with a message; links out of ``--images`` are not followed.
Each item records its path relative to ``--images`` and that folder: all ``rebuild`` may read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from artifact import Manifest
from service.embedding_transform import EmbeddingTransform, served_dim, served_vectors
from service.engine_choice import Engine
from service.images import ImageError, decode_image, thumbnail_jpeg
from service.index.errors import InvalidItemError
from service.index.store import IndexStore
from service.index.validate import check_id
from service.preprocess import eval_pixels

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass
class BuildReport:
    found: int = 0
    added: int = 0
    skipped: int = 0  # already indexed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    unmatched_metadata: int = 0
    seconds: float = 0.0  # time spent embedding and storing

    def summary(self) -> str:
        rate = f"; {self.added / self.seconds:.1f} images/s" if self.seconds > 0 else ""
        return (
            f"{self.found} images found: {self.added} added, {self.skipped} already indexed, "
            f"{len(self.failed)} failed{rate}"
        )


def find_images(root: Path, recursive: bool) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root} is not a folder")
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in pattern if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def item_id(relative: str) -> str:
    """The id for a relative POSIX path: '/' -> ':'; a hash when that is not a valid id."""
    candidate = relative.replace("/", ":")
    try:
        return check_id(candidate)
    except InvalidItemError:
        return "h:" + hashlib.sha256(relative.encode()).hexdigest()[:40]


def load_metadata(path: Path) -> dict[str, dict]:
    """``{key: object}`` from a JSON object (key -> metadata), or JSON/JSONL records that carry
    ``id`` or ``path`` (a relative path or an item id) and either a ``metadata`` object or, as
    metadata, their other fields."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"--metadata {path} is neither JSON nor JSON lines: {exc}") from None
    if isinstance(data, dict):
        records = [{"id": key, "metadata": value} for key, value in data.items()]
    elif isinstance(data, list):
        records = data
    else:
        raise ValueError(f"--metadata {path}: expected an object or records, got {type(data)}")
    out: dict[str, dict] = {}
    for n, record in enumerate(records, 1):
        key = record.get("path", record.get("id")) if isinstance(record, dict) else None
        if not isinstance(key, str):
            raise ValueError(f"--metadata {path}: record {n} has no string 'id' or 'path'")
        meta = record.get("metadata")
        if meta is None:
            meta = {k: v for k, v in record.items() if k not in ("id", "path")}
        if not isinstance(meta, dict):
            raise ValueError(f"--metadata {path}: the metadata of {key!r} is not an object")
        out[key] = meta
    return out


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def embed_files(
    paths: list[Path],
    manifest: Manifest,
    engine: Engine,
    max_pixels: int,
    thumbnail_side: int,
    transform: EmbeddingTransform | None = None,
) -> tuple[list[int], np.ndarray, list[bytes], list[tuple[str, str]]]:
    """Decode, preprocess and embed (then the artifact's transform, as the server does); returns
    (indices of the paths that worked, unit vectors, thumbnails, failures)."""
    embedder = FileEmbedder(manifest, engine, max_pixels, thumbnail_side, transform)
    return embedder(paths)


class FileEmbedder:
    """``embed_files`` for a whole build: ``prefetch`` starts decoding a batch in the pool while
    the engine still runs the one before, and each batch runs on every engine thread."""

    def __init__(
        self,
        manifest: Manifest,
        engine: Engine,
        max_pixels: int,
        thumbnail_side: int,
        transform: EmbeddingTransform | None = None,
    ) -> None:
        self.manifest, self.transform = manifest, transform
        self.prepare = partial(_prepare, manifest=manifest, max_pixels=max_pixels,
                               side=thumbnail_side)  # fmt: skip
        # A build runs one batch at a time: an OpenVINO engine split into streams would leave
        # all but one stream idle, so the batch goes to its all-threads model.
        self.run = getattr(engine, "run_solo", engine.run)

    def prefetch(self, paths: list[Path]) -> list[Future]:
        """Start decoding ``paths`` (Pillow releases the GIL: the images decode in parallel)."""
        return [_decode_pool().submit(self.prepare, path) for path in paths]

    def __call__(
        self, paths: list[Path], decoding: list[Future] | None = None
    ) -> tuple[list[int], np.ndarray, list[bytes], list[tuple[str, str]]]:
        kept, pixels, thumbs, failed = [], [], [], []
        for i, (path, job) in enumerate(zip(paths, decoding or self.prefetch(paths), strict=True)):
            done = job.result()
            if isinstance(done, str):
                failed.append((str(path), done))
                log.warning("skipping %s: %s", path, done)
                continue
            kept.append(i)
            pixels.append(done[0])
            thumbs.append(done[1])
        if not kept:
            return [], np.empty((0, served_dim(self.manifest)), np.float32), [], failed
        out = self.run(np.stack(pixels), ("embedding",))["embedding"]
        return kept, served_vectors(self.transform, out.astype(np.float32)), thumbs, failed


@functools.cache
def _decode_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode")


def _prepare(
    path: Path, manifest: Manifest, max_pixels: int, side: int
) -> tuple[np.ndarray, bytes] | str:
    """One file's eval pixels and thumbnail, or why it cannot be read."""
    try:
        img = decode_image(path.read_bytes(), max_pixels)
    except (ImageError, OSError) as exc:
        return str(exc)
    return eval_pixels(img, manifest), thumbnail_jpeg(img, side)


def _inside(root: Path, files: list[Path], report: BuildReport) -> list[Path]:
    """The files whose real path lies in ``root``: a symlink out of it is refused, not read."""
    kept = []
    for path in files:
        if path.resolve().is_relative_to(root):
            kept.append(path)
        else:
            report.failed.append((str(path), "a symbolic link out of --images; not followed"))
    return kept


def _unique_ids(
    store: IndexStore, files: list[Path], rel: dict, ids: dict, report: BuildReport
) -> list[Path]:
    """Files whose ids are their own. Two paths can map to one id ('a/b.jpg', 'a:b.jpg'): the
    one already indexed under it (else the first by name) keeps it, each other one fails with
    a message, and the rest of the build goes on; a re-run reaches the same outcome."""
    by_id: dict[str, list[Path]] = {}
    for path in files:
        by_id.setdefault(ids[path], []).append(path)
    losers: set[Path] = set()
    for iid, group in by_id.items():
        if len(group) < 2:
            continue
        stored = store.get(iid)
        keep = next((p for p in group if stored and rel[p] == stored.source), group[0])
        for path in group:
            if path != keep:
                losers.add(path)
                report.failed.append(
                    (str(path), f"its id {iid!r} is already the id of {rel[keep]!r} ('/' is "
                     "written ':' in ids); rename one of the two files")
                )  # fmt: skip
    return [p for p in files if p not in losers]


@dataclass(frozen=True)
class _Paths:
    """What a build stores about each file beside its vector."""

    ids: dict[Path, str]
    rel: dict[Path, str]
    metadata: dict[str, dict]
    root: str


def _embed_and_store(
    store: IndexStore, batches: list, embed, paths: _Paths, report: BuildReport, progress: bool
) -> None:
    """Embed and add each batch (durable per batch); with ``embed.prefetch`` the next batch
    decodes while this one runs."""
    prefetch = getattr(embed, "prefetch", None)
    ahead = prefetch(batches[0]) if prefetch and batches else None
    total = sum(len(b) for b in batches)
    ids, rel, metadata = paths.ids, paths.rel, paths.metadata
    with tqdm(total=total, unit="img", desc="indexing", disable=not progress) as bar:
        for n, batch in enumerate(batches):
            decoding = ahead
            if prefetch and n + 1 < len(batches):
                ahead = prefetch(batches[n + 1])
            kept, vectors, thumbs, failed = embed(batch, decoding) if prefetch else embed(batch)
            report.failed += failed
            if kept:
                chosen = [batch[i] for i in kept]
                store.add(
                    vectors,
                    ids=[ids[p] for p in chosen],
                    metadata=[metadata.get(rel[p], metadata.get(ids[p])) for p in chosen],
                    sources=[rel[p] for p in chosen],
                    source_roots=[paths.root] * len(chosen),
                    thumbnails=thumbs,
                )
                report.added += len(chosen)
            bar.update(len(batch))


def build_folder(
    store: IndexStore,
    images: Path,
    embed: Callable[[list[Path]], tuple[list[int], np.ndarray, list[bytes], list]],
    *,
    recursive: bool = False,
    metadata: dict[str, dict] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> BuildReport:
    """Index every image under ``images`` that is not indexed yet; each batch is durable.

    Each item records its path relative to ``images`` and that root, which is all ``rebuild``
    may re-read."""
    root = images.resolve()
    found = find_images(root, recursive)
    report = BuildReport(found=len(found))
    files = _inside(root, found, report)
    rel = {p: p.relative_to(root).as_posix() for p in files}
    ids = {p: item_id(rel[p]) for p in files}
    files = _unique_ids(store, files, rel, ids, report)
    done = store.existing(ids[p] for p in files)
    todo = [p for p in files if ids[p] not in done]
    report.skipped = len(files) - len(todo)
    metadata = metadata or {}
    used = {k for p in files for k in (rel[p], ids[p]) if k in metadata}
    report.unmatched_metadata = len(set(metadata) - used)
    if report.unmatched_metadata:
        log.warning("%d metadata records match no image file", report.unmatched_metadata)
    if report.skipped:
        log.info("%d of %d images are already indexed; skipping them", report.skipped, len(found))
    started = time.perf_counter()
    batches = list(_batches(todo, batch_size))
    paths = _Paths(ids, rel, metadata, str(root))
    _embed_and_store(store, batches, embed, paths, report, progress)
    report.seconds = time.perf_counter() - started
    return report
