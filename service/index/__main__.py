"""``python -m service.index {build,stats,rebuild}``: fill, inspect or rebuild the item index.

Defaults come from the server's settings (``DINO_MODELS_DIR``, ``DINO_MODEL``, ``DINO_DATA_DIR``,
``DINO_INDEX_TYPE``, ``DINO_THREADS``, ...), so the CLI and the server agree on the data dir
and model. Each command takes the data dir's lock (the server's) before it reads or changes
anything, so while the server runs they refuse with a message: stop the server first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from artifact import Manifest, load_manifest
from artifact.cli import UsageError, run_cli
from service.embedding_transform import (
    EmbeddingTransform,
    load_transform,
    served_dim,
    transform_key,
)
from service.engine_measure import choose_engine
from service.index.build import FileEmbedder, build_folder, load_metadata
from service.index.errors import IndexStoreError
from service.index.factory import location, open_index
from service.index.lock import DataDirBusy, DirLock
from service.index.meta import read_info
from service.index.rebuild import rebuild
from service.settings import Settings, find_model_dir

log = logging.getLogger("service.index")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.index", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser, model: bool) -> None:
        q.add_argument(
            "--data-dir", type=Path, help="index folder (default: DINO_DATA_DIR, ./data)"
        )
        q.add_argument(
            "--index-url",
            help="postgresql://... index database instead of --data-dir (default: DINO_INDEX_URL)",
        )
        if model:
            q.add_argument("--models-dir", type=Path, help="default: DINO_MODELS_DIR, ./models")
            q.add_argument(
                "--model", help="model name in the store (default: DINO_MODEL or the only one)"
            )
            q.add_argument(
                "--index-type", choices=("flat", "hnsw", "ivf"), help="default: DINO_INDEX_TYPE"
            )
            q.add_argument("--batch-size", type=int, default=32, help="images per inference call")
            q.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("build", help="embed a folder of images into the index (resumable)")
    b.add_argument("--images", type=Path, required=True, help="folder of images")
    b.add_argument("--recursive", action="store_true", help="include sub-folders")
    b.add_argument("--metadata", type=Path, help="JSON or JSONL: relative path or id -> object")
    b.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="embed on Ray workers (pip install '.[ray]'): a local cluster on 127.0.0.1, or the "
        "cluster at ADDRESS (e.g. auto, ray://head:10001)",
    )
    b.add_argument("--workers", type=int, default=2, help="--ray: worker actors, one engine each")
    b.add_argument(
        "--shard-size", type=int, default=256, help="--ray: images per shard (one transaction)"
    )
    common(b, model=True)
    common(sub.add_parser("stats", help="describe the index (no model needed)"), model=False)
    r = sub.add_parser("rebuild", help="re-embed stored sources with the current model")
    r.add_argument("--skip-missing", action="store_true", help="drop items whose source is gone")
    r.add_argument(
        "--legacy-root",
        type=Path,
        action="append",
        default=[],
        help="an --images folder of an index built before sources recorded their folder: "
        "absolute sources inside it may be re-read (repeatable)",
    )
    common(r, model=True)
    args = p.parse_args(argv)
    for flag in ("batch_size", "workers", "shard_size"):
        if getattr(args, flag, 1) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def _settings(args: argparse.Namespace) -> Settings:
    given = {
        "data_dir": args.data_dir,
        "models_dir": getattr(args, "models_dir", None),
        "model": getattr(args, "model", None),
        "index_type": getattr(args, "index_type", None),
        "index_url": args.index_url,
    }
    return Settings(**{k: v for k, v in given.items() if v is not None})


def _lock(data_dir: Path, command: str) -> DirLock:
    """The server's lock on the data dir, taken before anything in it is read or changed."""
    if not data_dir.is_dir():
        if command != "build":
            raise IndexStoreError(f"no index in {data_dir}; build one first")
        data_dir.mkdir(parents=True)
    try:
        return DirLock(data_dir)
    except DataDirBusy as exc:
        if command == "stats":
            raise IndexStoreError(f"{exc}; while it runs, ask it: GET /index") from None
        raise


def _recorded_type(settings: Settings) -> Settings:
    if "index_type" not in settings.model_fields_set:
        # Neither --index-type nor DINO_INDEX_TYPE: keep the data dir's type rather than
        # rebuilding it as flat behind the server's back.
        try:
            recorded = read_info(settings.data_dir)["type"]
        except IndexStoreError:
            recorded = None
        if recorded:
            settings = settings.model_copy(update={"index_type": recorded})
    return settings


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.index_url:  # a shared database: its own transactions, no data-dir lock
        return _on_database(args, settings)
    lock = _lock(settings.data_dir, args.command)
    try:
        return _locked(args, _recorded_type(settings), lock)
    finally:
        lock.release()  # a no-op when the store already released it


def _on_database(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "stats":
        from service.index.postgres import describe

        print(json.dumps(describe(settings.index_url), indent=2))
        return 0
    if args.command == "rebuild":
        raise ValueError(
            "rebuild re-embeds an embedded index in --data-dir; for a database, build a new one "
            "with `build --index-url NEW_URL` and point DINO_INDEX_URL at it"
        )
    return _locked(args, settings, None)


def _locked(args: argparse.Namespace, settings: Settings, lock: DirLock | None) -> int:
    if args.command == "stats":
        print(json.dumps(read_info(settings.data_dir), indent=2))
        return 0
    model_dir = find_model_dir(settings)
    manifest = load_manifest(model_dir)
    transform = load_transform(model_dir, manifest)
    key, dim = transform_key(transform), served_dim(manifest)
    # The server's own engine choice (measured and cached, or forced), so stored vectors and
    # queries come from the same computation.
    choice, engine = choose_engine(model_dir, manifest, settings)
    # Ray workers open exactly the chosen engine (no measuring of their own).
    c = choice.candidate
    pinned = {"engine": c.engine, "precision": c.engine_precision, "model_variant": c.variant}
    settings = settings.model_copy(update=pinned)
    embed = FileEmbedder(
        manifest, engine, settings.max_image_pixels, settings.thumbnail_side, transform
    )
    progress = not args.no_progress
    if args.command == "rebuild":
        report = rebuild(
            settings.data_dir,
            manifest.model_sha256,
            dim,
            embed,
            model_name=manifest.name,
            transform=key,
            index_type=settings.index_type,
            batch_size=args.batch_size,
            skip_missing=args.skip_missing,
            progress=progress,
            legacy_roots=args.legacy_root,
            lock=lock,
        )
        print(json.dumps(report, indent=2))
        return 0
    return _build(args, settings, lock, model_dir, manifest, embed, transform)


def _build(
    args: argparse.Namespace,
    settings: Settings,
    lock: DirLock | None,
    model_dir: Path,
    manifest: Manifest,
    embed: Callable,
    transform: EmbeddingTransform | None,
) -> int:
    progress = not args.no_progress
    metadata = load_metadata(args.metadata) if args.metadata else None
    sha, dim, key = manifest.model_sha256, served_dim(manifest), transform_key(transform)
    with open_index(
        settings, sha, dim, manifest.name, progress=progress, lock=lock, transform=key
    ) as store:
        if args.ray is not None:
            from service.index.ray_build import build_on_ray

            report = build_on_ray(
                store,
                args.images,
                model_dir,
                settings,
                address=args.ray or None,
                workers=args.workers,
                shard_size=args.shard_size,
                batch_size=args.batch_size,
                recursive=args.recursive,
                metadata=metadata,
                progress=progress,
            )
        else:
            report = build_folder(
                store,
                args.images,
                embed,
                recursive=args.recursive,
                metadata=metadata,
                batch_size=args.batch_size,
                progress=progress,
            )
        total = len(store)
    print(f"{report.summary()}; the index at {location(settings)} holds {total} items")
    for path, why in report.failed[:20]:
        print(f"  failed: {path}: {why}")
    return 0


def _run_argv(argv: list[str] | None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    try:
        return run(args)
    except IndexStoreError as exc:
        # The index refused (in use, another model's, sources it may not read): like bad input,
        # the message says what to change, so exit 2 rather than run_cli's 1 for a RuntimeError.
        raise UsageError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run_argv, argv, prog="python -m service.index")


if __name__ == "__main__":
    sys.exit(main())
