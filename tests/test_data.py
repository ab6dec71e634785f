"""Data sets: image folders (labelled or not, corrupt files skipped), Fashion-MNIST IDX, splits."""

from __future__ import annotations

import gzip
import logging
import struct

import numpy as np
import pytest
from PIL import Image

from training.data import (
    UNLABELLED,
    DatasetError,
    ImageFolderDataset,
    load_fashion_mnist,
    load_splits,
)


def _png(path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


@pytest.fixture
def labelled_dir(tmp_path):
    root = tmp_path / "imgs"
    for cls, value in (("cat", 10), ("dog", 200)):
        for i in range(5):
            _png(root / cls / f"{cls}{i}.png", value + i)
    (root / "dog" / "broken.png").write_bytes(b"this is not an image at all")
    return root


def test_class_subfolders_give_labels_and_skip_corrupt_files(labelled_dir, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(labelled_dir)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 10
    assert sorted(set(ds.labels)) == [0, 1]
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    image, label = ds[7]
    assert image.mode == "RGB" and label == 1


def test_flat_recursive_folder_is_unlabelled(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "deep" / "er" / "b.jpg", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 2 and ds.labels is None
    assert ds[0][1] == UNLABELLED


def test_truncated_image_is_skipped_at_load_time(tmp_path, caplog):
    _png(tmp_path / "good.png", 50, size=64)
    _png(tmp_path / "trunc.png", 90, size=64)
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])  # header fine, body cut
    ds = ImageFolderDataset(tmp_path)
    index = [p.name for p in ds.files].index("trunc.png")
    with caplog.at_level(logging.WARNING):
        image, _ = ds[index]
    assert np.asarray(image)[0, 0, 0] == 50  # the next readable image took its place
    assert any("trunc.png" in r.getMessage() for r in caplog.records)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no readable images"):
        ImageFolderDataset(tmp_path)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_parse(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 4]))
    train, test = load_fashion_mnist(tmp_path)
    assert len(train) == 7 and len(test) == 3
    np.testing.assert_array_equal(train.images, train_x)
    assert test.labels.tolist() == [9, 0, 4]
    image, label = test[0]
    assert image.size == (28, 28) and image.mode == "RGB" and label == 9


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "--fmnist-dir" in str(err.value)


def test_labelled_folder_splits_for_knn(labelled_dir):
    splits = load_splits("folder", str(labelled_dir), test_fraction=0.4)
    assert splits.labelled
    train_files = set(splits.knn_train.files)
    test_files = set(splits.knn_test.files)
    assert train_files and test_files and not train_files & test_files
    assert len(train_files) + len(test_files) == 10
    again = load_splits("folder", str(labelled_dir), test_fraction=0.4)
    assert set(again.knn_test.files) == test_files  # stable


def test_train_val_layout_is_used_as_given(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", i)
    splits = load_splits("folder", str(tmp_path))
    assert len(splits.train) == 8 and len(splits.knn_test) == 4


def test_folder_dataset_needs_a_path():
    with pytest.raises(DatasetError, match="--data"):
        load_splits("folder", None)
