"""Datasets for training and k-NN: image folders, Fashion-MNIST (IDX files), bundled photos.

Every dataset yields ``(transform(image), label)`` with ``label = -1`` when labels are unknown.
Images reach the transform as RGB PIL images, the same form the server feeds its model.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "coins", "moon")
UNLABELLED = -1


class DatasetError(ValueError):
    """The data asked for is missing or unusable; the message says what to do."""


# ---------------------------------------------------------------- in-memory arrays


class ArrayDataset(Dataset):
    """Images held as one uint8 array ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DatasetError(
                f"expected uint8 images [N,H,W(,3)], got {images.dtype} {images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def __getitem__(self, index: int):
        image = self.load(index)
        label = UNLABELLED if self.labels is None else int(self.labels[index])
        return (self.transform(image) if self.transform else image), label

    def with_transform(self, transform: Callable | None) -> ArrayDataset:
        return ArrayDataset(self.images, self.labels, transform, self.classes)


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not): magic, dims, big-endian sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: {array.size} bytes for shape {tuple(dims)}")
    return array.reshape(tuple(dims))


def load_fashion_mnist(root: str | os.PathLike | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST train (60k) and test (10k) splits from the standard IDX(.gz) files."""
    root = Path(root or FMNIST_DIR)
    arrays = {}
    for key, stem in FMNIST_FILES.items():
        candidates = [root / f"{stem}.gz", root / stem]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetError(
                f"Fashion-MNIST not found: no {stem}(.gz) in {root}. Install it with "
                f"`apt-get install dataset-fashion-mnist` (files land in {FMNIST_DIR}) or point "
                "--fmnist-dir at a folder holding the four IDX files."
            )
        arrays[key] = _read_idx(found)
    train = ArrayDataset(arrays["train_images"], arrays["train_labels"], classes=FMNIST_CLASSES)
    test = ArrayDataset(arrays["test_images"], arrays["test_labels"], classes=FMNIST_CLASSES)
    log.info("Fashion-MNIST from %s: %d train, %d test images", root, len(train), len(test))
    return train, test


def bundled_photos(names: Sequence[str] = PHOTO_NAMES, transform: Callable | None = None):
    """A few real photos shipped with scikit-image (offline), as an unlabelled dataset."""
    import skimage.data

    images = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in names]
    return ListDataset(images, transform=transform)


class ListDataset(Dataset):
    """PIL images in memory, with optional labels."""

    def __init__(self, images, labels=None, transform: Callable | None = None) -> None:
        self.images = list(images)
        self.labels = None if labels is None else list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].convert("RGB")
        label = UNLABELLED if self.labels is None else int(self.labels[index])
        return (self.transform(image) if self.transform else image), label

    def with_transform(self, transform: Callable | None) -> ListDataset:
        return ListDataset(self.images, self.labels, transform)


# ---------------------------------------------------------------- image folders


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _header_ok(path: Path) -> bool:
    """Cheap scan-time check: Pillow can identify the file from its header."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - reading the header is the check
        return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("skipping unreadable image %s: %s", path, exc)
        return False


class ImageFolderDataset(Dataset):
    """Images under ``root``: one subfolder per class (labelled) or any tree of images (unlabelled).

    Unreadable files are skipped with a warning: at scan time when the header is bad, and at load
    time (a truncated body) by logging and returning the next readable image instead.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        files: list[Path] | None = None,
        labels: list[int] | None = None,
        classes: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        if files is None:
            files, labels, classes = scan_image_folder(self.root)
        self.files = files
        self.labels = labels
        self.classes = classes

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int):
        for attempt in range(min(len(self.files), 10)):
            i = (index + attempt) % len(self.files)
            try:
                image = self.load(i)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                log.warning("skipping unreadable image %s: %s", self.files[i], exc)
                continue
            label = UNLABELLED if self.labels is None else self.labels[i]
            return (self.transform(image) if self.transform else image), label
        raise DatasetError(f"no readable image near index {index} in {self.root}")

    def with_transform(self, transform: Callable | None) -> ImageFolderDataset:
        return ImageFolderDataset(
            self.root, transform, files=self.files, labels=self.labels, classes=self.classes
        )

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        files = [self.files[i] for i in indices]
        return ImageFolderDataset(
            self.root, self.transform, files=files, labels=labels, classes=self.classes
        )


def scan_image_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Files, labels and class names under ``root`` (labels ``None`` for an unlabelled tree).

    The folder is labelled when it holds only subfolders (no images at the top) and each
    subfolder holds images; otherwise every image anywhere below it is an unlabelled sample.
    """
    if not root.is_dir():
        raise DatasetError(f"--data {root} is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_images = [p for p in root.iterdir() if p.is_file() and _is_image_file(p)]
    files: list[Path] = []
    if subdirs and not top_images:
        labels: list[int] | None = []
        classes: list[str] | None = [d.name for d in subdirs]
        for label, d in enumerate(subdirs):
            for p in sorted(d.rglob("*")):
                if p.is_file() and _is_image_file(p) and _header_ok(p):
                    files.append(p)
                    labels.append(label)
    else:
        labels = classes = None
        files = [p for p in sorted(root.rglob("*")) if p.is_file() and _is_image_file(p)]
        files = [p for p in files if _header_ok(p)]
    if not files:
        raise DatasetError(f"no readable images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {root}")
    kind = f"{len(classes)} classes" if classes else "no labels"
    log.info("image folder %s: %d images, %s", root, len(files), kind)
    return files, labels, classes


def _held_out(path: Path, fraction: float) -> bool:
    """A stable, order-free split: the file name's hash decides."""
    digest = hashlib.sha1(str(path.name).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


# ---------------------------------------------------------------- what the trainer asks for


@dataclass
class DataSplits:
    """``train`` feeds self-supervised training; ``knn_train``/``knn_test`` (labelled, or
    ``None``) feed the k-NN evaluation. Transforms are attached by the caller."""

    train: Dataset
    knn_train: Dataset | None
    knn_test: Dataset | None
    description: str

    @property
    def labelled(self) -> bool:
        return self.knn_train is not None and self.knn_test is not None


def load_splits(
    dataset: str,
    data_dir: str | None = None,
    fmnist_dir: str | None = None,
    test_fraction: float = 0.2,
) -> DataSplits:
    """Resolve ``dataset`` (``fmnist``, ``folder``, ``photos``) to train and k-NN splits.

    A folder with ``train/`` and ``val/`` (or ``test/``) subfolders uses them as given; a single
    labelled folder keeps a stable ``test_fraction`` of each class out of training for k-NN.
    """
    if dataset == "fmnist":
        train, test = load_fashion_mnist(fmnist_dir)
        return DataSplits(train, train, test, f"Fashion-MNIST ({fmnist_dir or FMNIST_DIR})")
    if dataset == "photos":
        return DataSplits(bundled_photos(), None, None, "bundled scikit-image photos")
    if dataset != "folder":
        raise DatasetError(f"unknown dataset {dataset!r}; use fmnist, folder or photos")
    if not data_dir:
        raise DatasetError("this preset trains on your images: pass --data DIR")
    root = Path(data_dir)
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = ImageFolderDataset(root / "train")
        test = ImageFolderDataset(test_dir)
        if train.labels is None or test.labels is None or train.classes != test.classes:
            return DataSplits(train, None, None, f"images in {root / 'train'}")
        return DataSplits(train, train, test, f"{root} (train / {test_dir.name})")
    full = ImageFolderDataset(root)
    if full.labels is None:
        return DataSplits(full, None, None, f"{len(full)} unlabelled images in {root}")
    held = [i for i, p in enumerate(full.files) if _held_out(p, test_fraction)]
    held_set = set(held)
    kept = [i for i in range(len(full)) if i not in held_set]
    if not held or not kept:
        return DataSplits(full, None, None, f"{len(full)} images in {root} (too few to split)")
    train = full.subset(kept)
    return DataSplits(train, train, full.subset(held), f"{root} ({len(kept)} / {len(held)} split)")
