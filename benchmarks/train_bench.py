"""Training section: images/s of one DINO step (student forward + backward over all crops,
teacher forward, EMA) for the quickstart and vit_small recipes, fp32 vs bf16 autocast, using the
project's Trainer on one pre-made batch. The quickstart cuts its crops from that batch inside the
step (batch augmentation, as in real training), so they are included; vit_small's per-image
crops run in loader workers in real training and are excluded. The quickstart runs at its own
batch (128), vit_small at a small one: its recipe's 256 would take minutes per step on a few
cores, and per-image cost barely depends on batch size here. fp32 and bf16 alternate over
rounds and the median round is kept."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time

from artifact.cpu import cpu_has_bf16
from benchmarks.common import Mode

log = logging.getLogger(__name__)

RECIPES = {
    "quickstart": {},  # its own batch of 128
    "vit_small": {"batch_size": 8},
}
SMOKE = {  # same code paths, toy sizes
    "quickstart": {"batch_size": 4, "vit_depth": 1, "out_dim": 256, "head_hidden_dim": 256},
    "vit_small": {
        "batch_size": 4,
        "global_size": 32,
        "local_size": 16,
        "vit_depth": 1,
        "out_dim": 256,
        "head_hidden_dim": 256,
        "n_local_crops": 2,
        "eval_crop": 32,
    },
}


def _images(n: int):
    from PIL import ImageOps

    from benchmarks.photos import real_photos

    photos, _ = real_photos()
    out = []
    while len(out) < n:  # flips of the real photos: enough distinct images for one batch
        for img in photos:
            out.append(img if (len(out) // len(photos)) % 2 == 0 else ImageOps.mirror(img))
    return out[:n]


def _step_img_s(recipe: str, precision: str, overrides: dict, steps: int) -> dict:
    import torch

    from training.config import preset
    from training.data import ListDataset
    from training.trainer import Plan, Trainer

    cfg = preset(recipe, precision=precision, num_workers=0, time_budget_min=None, **overrides)
    data = ListDataset(_images(max(cfg.batch_size, 16)))
    with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
        trainer = Trainer(cfg, data, run_dir, show_progress=False)
        n = len(trainer.loader)
        # Schedules long enough for the warm-up plus the timed steps whatever the data size.
        trainer.build_schedules(Plan(n, max(n, steps + 2), cfg.epochs))
        crops = next(iter(trainer.loader))[0]
        for _ in range(2):  # warm-up: first-call allocations and kernel selection
            trainer._step(crops)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer._step(crops)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    row = {
        "recipe": recipe,
        "precision": trainer.precision,
        "batch": cfg.batch_size,
        "crops": f"2x{cfg.global_size} + {cfg.n_local_crops}x{cfg.local_size}",
        "step_s": round(step_s, 3),
        "img_s": round(cfg.batch_size / step_s, 2),
        "torch_threads": torch.get_num_threads(),
    }
    log.info("train %s", row)
    return row


def _median_row(rows: list[dict]) -> dict:
    return sorted(rows, key=lambda row: row["step_s"])[len(rows) // 2]


def run(mode: Mode, threads: int, so_far: dict) -> dict:
    import torch

    torch.set_num_threads(threads)
    rows = []
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    for recipe, overrides in (SMOKE if mode.smoke else RECIPES).items():
        quick = recipe == "quickstart"
        steps = mode.train_steps if quick else max(1, mode.train_steps // 2)
        # fp32 and bf16 interleaved, median per precision: a load spike on a shared machine
        # then cannot land on one precision only. vit_small's steps are long: one round.
        seen: dict[str, list[dict]] = {p: [] for p in precisions}
        for _ in range(mode.rounds if quick else 1):
            for precision in precisions:
                seen[precision].append(_step_img_s(recipe, precision, overrides, steps))
        pair = [{**_median_row(r), "rounds": len(r)} for r in seen.values()]
        for row in pair:
            row["x_fp32"] = round(row["img_s"] / pair[0]["img_s"], 3)
        rows += pair
    return {"rows": rows, "cpu_has_bf16": cpu_has_bf16()}
