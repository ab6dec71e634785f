"""``python -m training.run``: train DINO, evaluate with k-NN, export a servable model.

    python -m training.run                                  # quickstart: Fashion-MNIST, <= 15 min
    python -m training.run --data DIR --out runs/mine       # your images (class subfolders or not)
    python -m training.run --preset vit_small --data /imagenet
    python -m training.run --out runs/mine --resume         # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m training.run ...         # DDP (gloo on CPU, nccl on GPU)

Every config field is a flag (``--lr``, ``--epochs``, ``--n-local-crops`` ...); the run folder
gets ``config.json``, ``checkpoint.pth``, ``metrics.jsonl``, ``train.log`` and ``knn.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from artifact import sha256_file
from artifact.cli import UsageError, run_cli
from training.checkpoints import read_checkpoint
from training.config import PRESETS, TrainConfig, add_config_flags, config_from_args
from training.data import load_splits
from training.distributed import DistInfo, barrier, cleanup, init_distributed
from training.eval_settings import EvalSettings
from training.trainer import CHECKPOINT_NAME, Trainer

log = logging.getLogger("training.run")

# Fields a resumed run may change: they do not touch the model or its schedules.
RESUMABLE_OVERRIDES = {
    "data",
    "fmnist_dir",
    "num_workers",
    "log_every",
    "knn_every",
    "knn_batch_size",
    "export_name",
    "models_dir",
    "export_int8",
    "embedding_pooling",
    "embedding_centre",
    "embedding_whiten",
    "time_budget_min",
    "precision",
    "threads",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.run",
        description=__doc__.split("\n\n")[0],
        epilog="Every flag after --device is a config field; its default is the preset's value.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="the recipe every other flag starts from. Default: quickstart (Fashion-MNIST, "
        "<= 15 min on 2 cores); on --resume the run's own. vit_small / resnet50: the paper's "
        "ImageNet recipes for your --data.",
    )
    p.add_argument(
        "--out",
        help="run folder for config, checkpoint, metrics and logs. Default: "
        "runs/<preset>-<time>; name it to --resume the run later.",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly where it stopped (same schedule; only "
        "run-time flags such as --num-workers may change). Default: a new run",
    )
    p.add_argument(
        "--no-export",
        action="store_true",
        help="skip the ONNX export at the end (sweeps, tests); by default every run leaves a "
        "servable model",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="Default: cuda when available; cpu to keep a GPU free",
    )
    add_config_flags(p)
    return p


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def resolve_config(args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """A new run's config from preset + flags; a resumed run's from its checkpoint."""
    if not args.resume:
        return config_from_args(args)
    ckpt = run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise UsageError(f"--resume: no {CHECKPOINT_NAME} in {run_dir}; pass the run's --out")
    cfg = TrainConfig.from_dict(read_checkpoint(ckpt)["config"])
    if args.preset not in (None, cfg.preset):
        raise UsageError(f"--resume: {run_dir} is a {cfg.preset} run, not {args.preset}")
    given = {k for k in vars(args) if k in cfg.to_dict() and k != "preset"}
    fixed = sorted(given - RESUMABLE_OVERRIDES)
    if fixed:
        raise UsageError(
            f"--resume continues the saved schedule; these flags would change it: {fixed}. "
            f"Only {sorted(RESUMABLE_OVERRIDES)} may change on resume."
        )
    for k in given:
        setattr(cfg, k, getattr(args, k))
    return cfg


def export_teacher(trainer: Trainer, cfg: TrainConfig, knn: dict | None, name: str) -> Path:
    from training.export import export_backbone, git_commit

    settings = EvalSettings(cfg.eval_resize, cfg.eval_crop, cfg.mean, cfg.std)
    ckpt = trainer.checkpoint_path
    provenance = {
        "source": "training",
        "git_commit": git_commit(),
        "training_config": cfg.to_dict(),
        "checkpoint_sha256": sha256_file(ckpt) if ckpt.is_file() else None,
    }
    path = export_backbone(
        trainer.teacher.backbone,
        name,
        cfg.models_dir,
        arch=cfg.arch,
        train_image_size=cfg.global_size,
        **settings.export_kwargs(),
        provenance=provenance,
        knn=knn,
        int8=cfg.export_int8,
        pooling=cfg.embedding_pooling,
    )
    if cfg.embedding_centre or cfg.embedding_whiten:
        _store_transform(trainer, cfg, path)
    return path


def _store_transform(trainer: Trainer, cfg: TrainConfig, path: Path) -> None:
    """The embedding transform beside the exported model: the one the k-NN fitted and measured,
    or, without labels (no k-NN), one fitted now on the training images through the graph."""
    from training.centring import add_transform, write_transform

    fit = trainer.embedding_fit
    if fit is None:
        add_transform(path, "training", cfg.embedding_whiten)
        return
    what = f"training images ({cfg.dataset}), the k-NN's memory set"
    info = write_transform(path, fit.mean, fit.projection, fit.images, what)
    log.info("embedding transform: %s to %d dims, stored with the model", info.kind,
             info.output_dim)  # fmt: skip


def set_threads(cfg: TrainConfig, dist: DistInfo) -> int:
    """Torch threads per process: by default the cores the loader workers leave free.

    More compute threads than free cores is far worse than fewer: OpenMP threads spin-wait for
    each other, and on 2 loaded cores 2 threads measured 6-10x slower than 1.
    """
    if cfg.threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // dist.world_size - cfg.num_workers)
    else:
        threads = cfg.threads
    if dist.device.type == "cpu":
        torch.set_num_threads(threads)
    return threads


def _log_start(cfg: TrainConfig, dist: DistInfo, run_dir: Path) -> None:
    log.info(
        "preset %s: %s (patch %s) on %s, %d epochs, batch %d over %d process(es) (backend %s), "
        "%s; run folder %s",
        cfg.preset,
        cfg.arch,
        cfg.patch_size,
        cfg.dataset if cfg.dataset != "folder" else cfg.data,
        cfg.epochs,
        cfg.batch_size,
        dist.world_size,
        torch.distributed.get_backend() if dist.distributed else "none",
        f"time budget {cfg.time_budget_min} min" if cfg.time_budget_min else "no time budget",
        run_dir,
    )


def _trainer(cfg: TrainConfig, dist: DistInfo, run_dir: Path, resume: bool) -> Trainer:
    """The trainer on the config's data (resumed from the run folder's checkpoint)."""
    splits = load_splits(cfg.dataset, cfg.data, cfg.fmnist_dir)
    knn_sets = (splits.knn_train, splits.knn_test) if splits.labelled else None
    trainer = Trainer(cfg, splits.train, run_dir, dist, knn_sets)
    log.info(
        "data: %s; %d training images, %d steps per epoch; precision %s; %d torch threads, "
        "%d loader workers",
        splits.description,
        len(trainer.dataset),
        len(trainer.loader),
        trainer.precision,
        torch.get_num_threads(),
        cfg.num_workers,
    )
    if resume:
        trainer.load_checkpoint()
    return trainer


def _train(args: argparse.Namespace, dist: DistInfo, run_dir: Path, t_start: float) -> dict:
    cfg = resolve_config(args, run_dir)
    set_threads(cfg, dist)
    if dist.is_main:
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    _log_start(cfg, dist, run_dir)
    trainer = _trainer(cfg, dist, run_dir, args.resume)
    deadline = t_start + 60 * cfg.time_budget_min if cfg.time_budget_min else None
    summary = trainer.fit(deadline)
    knn = trainer.run_knn("knn.json")
    summary["knn"] = knn
    if dist.is_main and not args.no_export:
        name = cfg.export_name or run_dir.name
        summary["export"] = str(export_teacher(trainer, cfg, knn, name))
        log.info("servable model: %s", summary["export"])
    barrier()
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done in %.1f min", summary["wall_seconds"] / 60)
    return summary


def run(argv: Sequence[str] | None = None) -> dict:
    """Train, evaluate and export; the run's summary. Raises on bad input or a failed run."""
    t_start = time.time()  # the time budget counts from here: data loading and export included
    args = parse_args(argv)
    if not args.resume:
        args.preset = args.preset or "quickstart"
    dist: DistInfo = init_distributed(args.device)
    run_dir = Path(args.out or f"runs/{args.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    setup_logging(run_dir, dist.is_main)
    try:
        return _train(args, dist, run_dir, t_start)
    except (ValueError, RuntimeError, OSError) as exc:
        log.error("%s", exc)  # train.log keeps the reason; run_cli prints it on stderr
        raise
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.run``: exit 0; 2 for bad flags or data; 1 when training diverges
    or the export fails."""
    return run_cli(run, argv, prog="python -m training.run")


if __name__ == "__main__":
    sys.exit(main())
