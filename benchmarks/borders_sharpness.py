"""Feature prediction measurements: decoder borders, perceptual sharpness, /distance sanity.

    python benchmarks/borders_sharpness.py --checkpoint runs/x/checkpoint.pth --model-dir models/x

1. Borders: decoders trained with zeros / reflect / pad-crop padding (L1, same budget) on crops of
   the training photos; on held-out photos, mean abs error in a band one patch wide along the
   edges vs the interior.
2. Sharpness: reflect decoders with L1 alone vs L1 + feature prediction (same steps): feature
   distance to the target and mean gradient magnitude relative to the target's (1 = as sharp).
3. Metric sanity: over real HTTP, ``POST /distance`` of every bundled photo against a lightly
   blurred and a JPEG copy vs against every other photo; the fraction where the copy is closer.

Writes ``benchmarks/results/feature_prediction.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torch import Tensor

from artifact.cli import run_cli
from training.checkpoints import read_checkpoint
from training.invert import InvertConfig, reconstruct, save_grid, train_decoder
from training.invert_data import HELD_OUT_PHOTOS, held_out_batch, load_images, load_photo, to_tensor
from training.parity import PHOTO_NAMES
from training.perceptual import FeaturePredictionLoss, backbone_from_checkpoint, checkpoint_stats

log = logging.getLogger("benchmarks.borders_sharpness")
RESULTS = Path(__file__).parent / "results" / "feature_prediction.json"


def border_interior(err: Tensor, band: int) -> dict:
    """Mean abs error in the ``band``-pixel frame vs inside it; ``err [B, H, W]``."""
    mask = torch.zeros(err.shape[-2:], dtype=torch.bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    border, interior = err[:, mask].mean().item(), err[:, ~mask].mean().item()
    return {
        "border": round(border, 5),
        "interior": round(interior, 5),
        "ratio": round(border / interior, 4),
    }


def grad_magnitude(x: Tensor) -> float:
    """Mean |dx| + |dy| over pixels and channels: high-frequency energy."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return float(dx + dy)


def run_decoders(args: argparse.Namespace) -> dict:
    ckpt = read_checkpoint(args.checkpoint)
    backbone = backbone_from_checkpoint(ckpt)
    mean, std = checkpoint_stats(ckpt) or ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images = load_images(None)
    held = held_out_batch(
        [to_tensor(load_photo(n)) for n in HELD_OUT_PHOTOS], args.image_size, args.held_out
    )
    fp_metric = FeaturePredictionLoss(backbone, mean=mean, std=std)
    band = backbone.patch_size
    variants = [("zeros", "l1"), ("reflect", "l1"), ("pad-crop", "l1"), ("reflect", "l1+fp")]
    runs = {}
    for padding, loss in variants:
        cfg = InvertConfig(
            image_size=args.image_size,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            padding=padding,
            loss=loss,
            width=args.width,
            min_width=args.min_width,
            seed=0,
            pool=args.pool,
        )
        t0 = time.perf_counter()
        decoder, tokens, history = train_decoder(backbone, images, cfg, mean=mean, std=std)
        with torch.no_grad():
            recon = reconstruct(decoder, tokens, held)
            err = (recon - held).abs().mean(dim=1)
            fp = fp_metric(recon, held).item()
        key = f"{padding}/{loss}"
        runs[key] = {
            "config": asdict(cfg),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "final_train": history[-1],
            "held_out_l1": round(err.mean().item(), 5),
            "borders": border_interior(err, band),
            "feature_distance": round(fp, 5),
            "grad_ratio": round(grad_magnitude(recon) / grad_magnitude(held), 4),
        }
        save_grid(held, recon, args.grids / f"{padding}-{loss.replace('+', '_')}.png")
        log.info("%s: %s", key, runs[key])
    return {
        "backbone": {
            "checkpoint": str(args.checkpoint),
            "arch": f"vit, embed {backbone.embed_dim}, depth {len(backbone.blocks)}, patch {band}",
        },
        "held_out": {"photos": HELD_OUT_PHOTOS, "crops": args.held_out, "size": args.image_size},
        "border_band_px": band,
        "runs": runs,
    }


def degraded(img: Image.Image, kind: str) -> Image.Image:
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=max(1.0, max(img.size) / 256)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=30)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


async def metric_sanity(model_dir: Path) -> dict:
    import httpx

    from service.app import create_app
    from service.settings import Settings

    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            models_dir=model_dir.parent,
            model=model_dir.name,
            data_dir=data_dir,
            threads=1,
            _env_file=None,
        )
        app = create_app(settings)
        photos = {n: load_photo(n) for n in PHOTO_NAMES}
        png = {}
        for name, img in photos.items():
            for kind in ("orig", "blur", "jpeg"):
                im = img if kind == "orig" else degraded(img, kind)
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                png[name, kind] = buf.getvalue()
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=120
            ) as c:

                async def dist(a: tuple, b: tuple) -> dict:
                    r = await c.post("/distance", files={"image_a": png[a], "image_b": png[b]})
                    r.raise_for_status()
                    return r.json()

                rows = {}
                for name in PHOTO_NAMES:
                    others = [
                        await dist((name, "orig"), (o, "orig")) for o in PHOTO_NAMES if o != name
                    ]
                    row = {}
                    for kind in ("blur", "jpeg"):
                        d = await dist((name, "orig"), (name, kind))
                        for key in ("embedding_distance", "patch_distance"):
                            nearest_other = min(o[key] for o in others)
                            row[f"{kind}/{key}"] = {
                                "copy": round(d[key], 5),
                                "nearest_other": round(nearest_other, 5),
                                "closer": d[key] < nearest_other,
                            }
                    rows[name] = row
    fractions = {}
    for key in next(iter(rows.values())):
        hits = [r[key]["closer"] for r in rows.values()]
        fractions[key] = f"{sum(hits)}/{len(hits)}"
    return {
        "model_dir": str(model_dir),
        "photos": list(PHOTO_NAMES),
        "fractions": fractions,
        "per_photo": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, help="exported model for the /distance check")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--min-width", type=int, default=16)
    p.add_argument("--pool", type=int, default=512, help="crops with cached tokens (0: fresh)")
    p.add_argument("--held-out", type=int, default=48, help="held-out crops")
    p.add_argument("--grids", type=Path, default=Path("benchmarks/results/feature_prediction"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--skip-decoders", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: dict = {"torch_threads": torch.get_num_threads()}
    if args.out.is_file():
        result = {**json.loads(args.out.read_text()), **result}
    if not args.skip_decoders:
        result["decoders"] = run_decoders(args)
    if args.model_dir is not None:
        result["distance_sanity"] = asyncio.run(metric_sanity(args.model_dir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "distance_sanity"}, indent=1)[:4000])
    if "distance_sanity" in result:
        print(json.dumps(result["distance_sanity"]["fractions"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.borders_sharpness"))
