"""The training data path: augmentation (per image in the loader, or per batch on the device),
the distributed sampler and the loader, and the k-NN sets with the eval transform."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from training.augment import MultiCropAugmentation, eval_transform
from training.batch_augment import BatchMultiCrop, GreyTensor
from training.config import TrainConfig
from training.distributed import DistInfo


@dataclass
class TrainLoader:
    dataset: Dataset  # the training images with their transform
    sampler: DistributedSampler
    loader: DataLoader
    batch_aug: BatchMultiCrop | None  # batch mode: crops cut per batch on the device
    n_crops: int
    batch_per_rank: int


def build_train_loader(cfg: TrainConfig, train_set: Dataset, dist: DistInfo) -> TrainLoader:
    """Raises ``ValueError`` when the batch does not split over the processes or the data makes
    no full batch."""
    crop_args = (
        cfg.global_size,
        cfg.local_size,
        tuple(cfg.global_scale),
        tuple(cfg.local_scale),
        cfg.n_local_crops,
        cfg.mean,
        cfg.std,
    )
    # Batch mode: the loader yields grey uint8 images and the crops are cut per batch on the
    # training device (~25x cheaper than per-image PIL transforms for 28-px images).
    batch_aug = BatchMultiCrop(*crop_args) if cfg.batch_augment else None
    if batch_aug is not None:
        n_crops = batch_aug.n_crops
        dataset = train_set.with_transform(GreyTensor(cfg.global_size))
    else:
        aug = MultiCropAugmentation(*crop_args, grayscale=cfg.grayscale)
        n_crops = aug.n_crops
        dataset = train_set.with_transform(aug)
    world = dist.world_size
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    batch_per_rank = cfg.batch_size // world
    # Also used in one process: a seeded permutation per epoch makes resume exact.
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=dist.rank, seed=cfg.seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_per_rank,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        pin_memory=dist.device.type == "cuda",
    )
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} training images make no full batch of {cfg.batch_size}; "
            "lower --batch-size or add images"
        )
    return TrainLoader(dataset, sampler, loader, batch_aug, n_crops, batch_per_rank)


def knn_eval_sets(
    cfg: TrainConfig, knn_sets: tuple[Dataset, Dataset] | None
) -> tuple[Dataset, Dataset] | None:
    """The k-NN train and test sets seen through the eval transform (``None`` stays ``None``)."""
    if knn_sets is None:
        return None
    tf = eval_transform(cfg.eval_resize, cfg.eval_crop, cfg.mean, cfg.std)
    return knn_sets[0].with_transform(tf), knn_sets[1].with_transform(tf)
