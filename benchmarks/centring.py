"""Do centred (or whitened) embeddings make scores usable as thresholds? Measured on an exported
artifact with Fashion-MNIST, through the server's preprocessing and the exported ONNX graph:

* weighted k-NN accuracy (k=20, T=0.07, DINO's protocol as in ``training.knn``) with raw,
  centred and whitened embeddings;
* scores of unrelated pairs vs augmented copies (crop, resize, JPEG, blur, colour jitter), before
  and after, with a histogram plot;
* precision and recall of ``/duplicates``' pair search at its default threshold on a synthetic
  copy-detection set (copies of Fashion-MNIST test images and of the offline photos hidden among
  distractors), and a threshold sweep.

    python -m benchmarks.centring --model models/quickstart

Writes ``benchmarks/results/<date>-<cpu>-centring[-<tag>].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from artifact import INPUT_NAME, MODEL_FILE, load_manifest
from artifact.cosine import l2_normalise
from benchmarks.common import machine
from benchmarks.copies import AUGMENTS, copies, copy_set, offline_photos
from service.embedding_transform import load_transform
from service.preprocess import eval_pixels
from service.routes_duplicates import DEFAULT_THRESHOLD

log = logging.getLogger("benchmarks.centring")
RESULTS = Path(__file__).parent / "results"
Variant = Callable[[np.ndarray], np.ndarray]  # raw embeddings -> unit rows


class Embedder:
    """The exported fp32 graph in onnxruntime, fed by the server's own eval transform."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        self.manifest = load_manifest(model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: list[Image.Image], batch: int = 256) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch):
            pixels = np.stack(
                [eval_pixels(im, self.manifest) for im in images[start : start + batch]]
            )
            out.append(self.session.run(["embedding"], {INPUT_NAME: pixels})[0])
        return np.concatenate(out).astype(np.float32)


def weighted_knn(train, train_y, test, test_y, k: int = 20, t: float = 0.07) -> float:
    """DINO's weighted k-NN top-1 (%) on unit rows: each of the k nearest votes exp(cos / T)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, len(test), 1000):
        sim = test[start : start + 1000] @ train.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sim, idx, axis=1) / t)
        votes = np.zeros((len(sim), classes))
        np.add.at(votes, (np.arange(len(sim))[:, None], train_y[idx]), weights)
        correct += int((votes.argmax(axis=1) == test_y[start : start + 1000]).sum())
    return 100.0 * correct / len(test)


def variants(model_dir: Path, manifest, raw_train: np.ndarray, whiten: list[int]) -> dict:
    """raw, centred on the training images (as ``--centre-on training`` fits it), whitened, and
    the artifact's own transform when it carries one."""
    from training.centring import fit

    mean, _ = fit(raw_train)
    out: dict[str, Variant] = {
        "raw": lambda x: l2_normalise(x),
        "centred": lambda x: l2_normalise(x - mean),
    }
    for dim in whiten:
        w_mean, projection = fit(raw_train, dim)
        out[f"whitened-{dim}"] = lambda x, m=w_mean, p=projection: l2_normalise((x - m) @ p)
    transform = load_transform(model_dir, manifest)
    if transform is not None:
        out[f"artifact ({transform.info.kind})"] = lambda x: l2_normalise(transform.apply(x))
    return out


def score_distributions(embed: Embedder, test_images, n: int, seed: int) -> dict:
    """Raw embeddings of ``n`` originals, their copies per augmentation, and random pairs."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(test_images), n, replace=False)
    originals = [test_images[int(i)] for i in picks]
    copied = [copies(im, rng) for im in originals]
    kinds = [*AUGMENTS, "all"]
    a = rng.integers(0, n, 4 * n)
    b = (a + rng.integers(1, n, 4 * n)) % n  # never the same image
    return {
        "originals": embed(originals),
        "copies": {k: embed([c[k] for c in copied]) for k in kinds},
        "pairs": (a, b),
    }


def summarise(scores: np.ndarray) -> dict:
    q = np.percentile(scores, [5, 50, 95])
    return {
        "p5": round(float(q[0]), 4),
        "median": round(float(q[1]), 4),
        "p95": round(float(q[2]), 4),
    }


def detection(vectors: np.ndarray, truth: set, threshold: float) -> dict:
    """Pair precision / recall of "score above threshold" (what /duplicates links). An exact
    score matrix, not /duplicates' capped search: raw embeddings link millions of pairs."""
    sims = vectors @ vectors.T
    i, j = np.nonzero(np.triu(sims > threshold, k=1))
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    hits = len(found & truth)
    precision = hits / len(found) if found else 1.0
    return {
        "threshold": threshold,
        "predicted_pairs": len(found),
        "true_pairs": len(truth),
        "precision": round(precision, 4),
        "recall": round(hits / len(truth), 4),
    }


def plot(dists: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dists)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), sharey=True)
    bins = np.linspace(-1, 1, 81)
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        d = dists[name]
        ax.hist(d["unrelated"], bins, alpha=0.6, density=True, label="unrelated pairs")
        ax.hist(d["copies"], bins, alpha=0.6, density=True, label="augmented copies")
        ax.set_title(name)
        ax.set_xlabel("cosine score")
    np.atleast_1d(axes)[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cached_embeddings(cache, embed, train, tr, test, te) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings of the chosen train / test images, read from (or saved to) ``cache``."""
    if cache and cache.is_file():
        with np.load(cache) as saved:
            return saved["train"], saved["test"]
    raw_train = embed([train.load(int(i)) for i in tr])
    raw_test = embed([test.load(int(i)) for i in te])
    if cache:
        np.savez(cache, train=raw_train, test=raw_test)
    return raw_train, raw_test


def _score_summaries(ways: dict, d: dict) -> tuple[dict, dict]:
    """Per embedding variant: the raw score arrays (for the plot) and their summaries."""
    dists, summary = {}, {}
    for name, f in ways.items():
        orig = f(d["originals"])
        per_kind = {k: (orig * f(v)).sum(axis=1) for k, v in d["copies"].items()}
        unrelated = (orig[d["pairs"][0]] * orig[d["pairs"][1]]).sum(axis=1)
        every_copy = np.concatenate(list(per_kind.values()))
        dists[name] = {"unrelated": unrelated, "copies": every_copy}
        summary[name] = {
            "unrelated": summarise(unrelated),
            "copies": summarise(every_copy),
            "copies_by_augmentation": {k: summarise(v) for k, v in per_kind.items()},
        }
    return dists, summary


def _copy_detection(embed, ways: dict, test_images: list, args: argparse.Namespace):
    """The synthetic copy set, and precision / recall per variant at the default threshold and
    over a sweep of thresholds."""
    cs = copy_set(
        [test_images[i] for i in range(args.copy_originals)] + offline_photos(),
        [
            test_images[i]
            for i in range(args.copy_originals, args.copy_originals + args.distractors)
        ],
        args.seed,
    )
    raw_cs, truth = embed(cs.images), cs.true_pairs()
    sweep = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    return cs, {
        name: {
            "default": detection(f(raw_cs), truth, DEFAULT_THRESHOLD),
            "sweep": [detection(f(raw_cs), truth, t) for t in sweep],
        }
        for name, f in ways.items()
    }


def run(args: argparse.Namespace) -> dict:
    from training.data import load_fashion_mnist

    t0 = time.perf_counter()
    embed = Embedder(args.model, args.threads)
    train, test = load_fashion_mnist(args.fmnist_dir)
    rng = np.random.default_rng(args.seed)
    tr = np.sort(rng.permutation(len(train))[: args.train_limit])
    te = np.sort(rng.permutation(len(test))[: args.test_limit])
    raw_train, raw_test = _cached_embeddings(args.cache, embed, train, tr, test, te)
    log.info("embedded %d + %d images in %.0f s", len(tr), len(te), time.perf_counter() - t0)
    ways = variants(args.model, embed.manifest, raw_train, args.whiten)
    knn = {
        name: round(weighted_knn(f(raw_train), train.labels[tr], f(raw_test), test.labels[te]), 2)
        for name, f in ways.items()
    }
    test_images = [test.load(i) for i in range(len(test))]
    d = score_distributions(embed, test_images, args.pairs, args.seed)
    dists, summary = _score_summaries(ways, d)
    cs, copy_detection = _copy_detection(embed, ways, test_images, args)
    return {
        "model": embed.manifest.name,
        "arch": embed.manifest.arch,
        "model_sha256": embed.manifest.model_sha256,
        "embedding_transform": (
            embed.manifest.embedding_transform.model_dump()
            if embed.manifest.embedding_transform
            else None
        ),
        "knn_top1": knn,
        "knn_setup": {"train": len(tr), "test": len(te), "k": 20, "temperature": 0.07},
        "scores": summary,
        "pairs_setup": {"originals": args.pairs, "unrelated_pairs": 4 * args.pairs},
        "copy_detection": copy_detection,
        "copy_set": {
            "images": len(cs.images),
            "originals": int((np.asarray(cs.kind) == "original").sum()),
            "copies_each": len(AUGMENTS) + 1,
            "distractors": args.distractors,
        },
        "default_threshold": DEFAULT_THRESHOLD,
        "machine": machine(),
        "seconds": round(time.perf_counter() - t0, 1),
        "_dists": dists,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.centring", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", type=Path, required=True, help="the artifact folder to measure")
    p.add_argument("--fmnist-dir", help="Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--train-limit", type=int, default=60_000, help="k-NN training images")
    p.add_argument("--test-limit", type=int, default=10_000, help="k-NN test images")
    p.add_argument("--whiten", type=int, nargs="*", default=[64, 128], help="whitening dims to try")
    p.add_argument("--pairs", type=int, default=1000, help="originals for the score distributions")
    p.add_argument("--copy-originals", type=int, default=200, help="Fashion-MNIST images copied")
    p.add_argument("--distractors", type=int, default=2000, help="unrelated images in the copy set")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    p.add_argument(
        "--cache", type=Path, help="npz keeping the k-NN embeddings between runs of one model"
    )
    p.add_argument("--tag", help="appended to the results file names (e.g. the model's run)")
    p.add_argument("--seed", type=int, default=0, help="sampling and augmentation seed")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    from benchmarks.centring_report import write_results

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    cpu = re.sub(r"[^a-z0-9]+", "-", result["machine"]["cpu"].lower()).strip("-")[:40]
    tag = f"-{args.tag}" if args.tag else ""
    stem = args.out / f"{time.strftime('%Y-%m-%d')}-{cpu}-centring{tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result.pop("_dists"), stem.with_suffix(".png"))
    write_results(result, stem)
    print(json.dumps({k: result[k] for k in ("knn_top1", "default_threshold")}, indent=2))
    return stem


if __name__ == "__main__":
    main()
