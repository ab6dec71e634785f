"""``make run``: from a fresh clone to a serving model in one command.

1. If the model store holds no model, train the quickstart model on Fashion-MNIST and export it.
2. Write the gallery (the Fashion-MNIST test images with their class names, plus the photos
   bundled with scikit-image) under ``DATA_DIR/gallery`` once.
3. Index the gallery with ``python -m service.index build`` (resumable: a second run skips it all).
4. Replace this process with the torch-free server, ``python -m service``.

Each step is the same command a user could run by hand; this module only strings them together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from artifact.cli import RunFailed, UsageError, run_cli

GALLERY_MARKER = ".complete"


def say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def models_in(models_dir: Path) -> list[str]:
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if (p / "manifest.json").is_file())


def check_fashion_mnist(fmnist_dir: str | None) -> None:
    """Fail early, with the install command, rather than minutes into a run."""
    from training.data import DatasetError, load_fashion_mnist

    try:
        load_fashion_mnist(fmnist_dir)
    except DatasetError as exc:
        raise UsageError(str(exc)) from None


def run_step(what: str, estimate: str, command: list[str], env: dict[str, str]) -> None:
    say(f"{what} ({estimate}): {' '.join(command[1:])}")
    started = time.time()
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        message = f"{what} failed (exit {result.returncode}); the lines above say why"
        # The step's own usage errors are this command's too (flags after -- go to training.run).
        raise (UsageError if result.returncode == 2 else RunFailed)(message)
    say(f"{what}: done in {time.time() - started:.0f} s")


def write_gallery(gallery: Path, fmnist_dir: str | None, limit: int | None) -> int:
    """Gallery images as files plus ``metadata.jsonl`` (one ``{"id", ...}`` object a line)."""
    if (gallery / GALLERY_MARKER).is_file():
        return sum(1 for _ in open(gallery / "metadata.jsonl"))
    import skimage.data
    from PIL import Image

    from training.data import FMNIST_CLASSES, PHOTO_NAMES, load_fashion_mnist

    _, test = load_fashion_mnist(fmnist_dir)
    count = len(test) if limit is None else min(limit, len(test))
    say(f"writing the gallery: {count} Fashion-MNIST test images and {len(PHOTO_NAMES)} photos")
    records = []
    for i in range(count):
        label = FMNIST_CLASSES[int(test.labels[i])]
        rel = f"fashion-mnist/{label.replace('/', '-')}/{i:05d}.png"
        (gallery / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i]).save(gallery / rel)
        records.append({"id": rel, "label": label, "dataset": "Fashion-MNIST test", "index": i})
    for name in PHOTO_NAMES:
        rel = f"photos/{name}.jpg"
        (gallery / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(
            gallery / rel, quality=92
        )
        records.append({"id": rel, "label": name, "dataset": "scikit-image photos"})
    with open(gallery / "metadata.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    (gallery / GALLERY_MARKER).touch()
    return len(records)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models-dir",
        default=os.environ.get("DINO_MODELS_DIR", "models"),
        help="model store to train into and serve from. Default: $DINO_MODELS_DIR, else models",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("DINO_DATA_DIR", "data"),
        help="where the gallery and its index go. Default: $DINO_DATA_DIR, else data",
    )
    p.add_argument(
        "--name",
        default="quickstart",
        help="name of the model to train and serve. Default: quickstart; an existing model of "
        "that name is served without training",
    )
    p.add_argument(
        "--fmnist-dir",
        help="folder with the Fashion-MNIST IDX files. Default: the Debian package's place",
    )
    p.add_argument(
        "--gallery-size",
        type=int,
        help="Fashion-MNIST test images to index. Default: all 10,000; fewer for a faster start",
    )
    p.add_argument(
        "--run-dir",
        default="runs/quickstart",
        help="training run folder. Default: runs/quickstart",
    )
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="stop before starting the server (CI, or to start it yourself)",
    )
    p.add_argument(
        "train_args", nargs="*", help="extra flags for training.run (after --), e.g. -- --epochs 1"
    )
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    """Train if needed, index the gallery, then become the server (unless ``--no-serve``)."""
    args = parse_args(argv)
    models_dir, data_dir = Path(args.models_dir), Path(args.data_dir)
    env = {**os.environ, "DINO_MODELS_DIR": str(models_dir), "DINO_DATA_DIR": str(data_dir)}
    python = sys.executable

    available = models_in(models_dir)
    if available:
        name = args.name if args.name in available else available[0]
        say(f"using the model {name!r} from {models_dir}/ (delete it to train again)")
    else:
        check_fashion_mnist(args.fmnist_dir)
        name = args.name
        fmnist = ["--fmnist-dir", args.fmnist_dir] if args.fmnist_dir else []
        command = [python, "-m", "training.run", "--preset", "quickstart", "--out", args.run_dir]
        command += ["--export-name", name, "--models-dir", str(models_dir), *fmnist]
        run_step(
            "training the quickstart model", "at most 15 minutes", command + args.train_args, env
        )
    env["DINO_MODEL"] = name

    gallery = data_dir / "gallery"
    count = write_gallery(gallery, args.fmnist_dir, args.gallery_size)
    command = [python, "-m", "service.index", "build", "--images", str(gallery), "--recursive"]
    command += ["--metadata", str(gallery / "metadata.jsonl")]
    estimate = f"{count} images, about a minute the first time, seconds after"
    run_step("indexing the gallery", estimate, command, env)

    if args.no_serve:
        say("done; start the server with `python -m service`")
        return
    host, port = env.get("DINO_HOST", "127.0.0.1"), env.get("DINO_PORT", "8000")
    say(f"starting the server: open http://{host}:{port}/ (Ctrl-C stops it)")
    os.execve(python, [python, "-m", "service"], env)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.quickstart``: exit 2 when the data set is missing or a step refuses
    its flags, 1 when a step fails."""
    return run_cli(run, argv, prog="python -m training.quickstart")


if __name__ == "__main__":
    sys.exit(main())
