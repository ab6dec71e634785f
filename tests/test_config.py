"""Every preset resolves to exactly the config it did before the defaults became the quickstart
recipe, and the dataclass defaults are that recipe."""

from __future__ import annotations

import pytest

from training.config import PRESETS, TrainConfig, preset

# preset("quickstart").to_dict(), field by field.
QUICKSTART = {
    "arch": "vit_tiny",
    "batch_augment": True,
    "batch_size": 128,
    "clip_grad": 3.0,
    "data": None,
    "dataset": "fmnist",
    "drop_path_rate": 0.0,
    "epochs": 10,
    "eval_crop": 28,
    "eval_resize": 28,
    "embedding_centre": False,
    "embedding_pooling": "cls+patch_mean",
    "embedding_whiten": 384,
    "export_int8": False,
    "export_name": None,
    "fmnist_dir": None,
    "freeze_last_layer": 0.0,
    "global_scale": (0.4, 1.0),
    "global_size": 28,
    "grayscale": True,
    "head_bottleneck_dim": 256,
    "head_hidden_dim": 1024,
    "knn_batch_size": 512,
    "knn_every": 0,
    "knn_k": 20,
    "knn_temperature": 0.07,
    "koleo_weight": 0.0,
    "local_scale": (0.1, 0.4),
    "local_size": 14,
    "log_every": 20,
    "lr": 0.004,
    "mean": (0.286, 0.286, 0.286),
    "mim_prob": 0.5,
    "mim_ratio": (0.1, 0.5),
    "mim_weight": 0.0,
    "min_lr": 1e-05,
    "models_dir": "models",
    "momentum_teacher": 0.98,
    "momentum_teacher_end": 0.995,
    "n_local_crops": 2,
    "norm_last_layer": False,
    "num_workers": 0,
    "optimizer": "adamw",
    "out_dim": 256,
    "patch_size": 7,
    "precision": "auto",
    "preset": "quickstart",
    "seed": 0,
    "std": (0.353, 0.353, 0.353),
    "teacher_centering": "ema",
    "teacher_temp": 0.03,
    "threads": None,
    "time_budget_min": 14.0,
    "use_bn_in_head": True,
    "vit_depth": 4,
    "warmup_epochs": 0.2,
    "warmup_teacher_temp": 0.03,
    "warmup_teacher_temp_epochs": 0,
    "weight_decay": 0.04,
    "weight_decay_end": 0.04,
}

# The other presets, as their differences from the quickstart.
DIFFERENCES = {
    "dinov2": {
        "arch": "dinov2_vits14_reg",
        "patch_size": 14,
        "global_size": 56,
        "local_size": 28,
        "eval_resize": 64,
        "eval_crop": 56,
        "teacher_centering": "sinkhorn",
        "koleo_weight": 0.1,
        "mim_weight": 1.0,
    },
    "quickstart_long": {
        "epochs": 20,
        "knn_every": 4,
        "momentum_teacher_end": 1.0,
        "preset": "quickstart_long",
        "time_budget_min": None,
    },
    "resnet50": {
        "arch": "resnet50",
        "batch_augment": False,
        "batch_size": 256,
        "clip_grad": 0.0,
        "dataset": "folder",
        "epochs": 100,
        "eval_crop": 224,
        "eval_resize": 256,
        "freeze_last_layer": 1,
        "global_scale": (0.14, 1.0),
        "global_size": 224,
        "grayscale": False,
        "head_hidden_dim": 2048,
        "knn_every": 10,
        "local_scale": (0.05, 0.14),
        "local_size": 96,
        "lr": 0.03,
        "mean": (0.485, 0.456, 0.406),
        "min_lr": 0.0048,
        "momentum_teacher": 0.996,
        "momentum_teacher_end": 1.0,
        "n_local_crops": 6,
        "norm_last_layer": True,
        "num_workers": 8,
        "optimizer": "sgd",
        "out_dim": 65536,
        "patch_size": 16,
        "embedding_pooling": "cls",
        "embedding_whiten": None,
        "preset": "resnet50",
        "std": (0.229, 0.224, 0.225),
        "teacher_temp": 0.07,
        "time_budget_min": None,
        "use_bn_in_head": False,
        "vit_depth": None,
        "warmup_epochs": 10,
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 50,
        "weight_decay": 0.0001,
        "weight_decay_end": 0.0001,
    },
    "vit_small": {
        "arch": "vit_small",
        "batch_augment": False,
        "batch_size": 256,
        "dataset": "folder",
        "drop_path_rate": 0.1,
        "epochs": 100,
        "eval_crop": 224,
        "eval_resize": 256,
        "freeze_last_layer": 1,
        "global_size": 224,
        "grayscale": False,
        "head_hidden_dim": 2048,
        "knn_every": 10,
        "local_scale": (0.05, 0.4),
        "local_size": 96,
        "lr": 0.0005,
        "mean": (0.485, 0.456, 0.406),
        "momentum_teacher": 0.996,
        "momentum_teacher_end": 1.0,
        "n_local_crops": 10,
        "num_workers": 8,
        "out_dim": 65536,
        "patch_size": 16,
        "embedding_pooling": "cls",
        "embedding_whiten": None,
        "preset": "vit_small",
        "std": (0.229, 0.224, 0.225),
        "teacher_temp": 0.07,
        "time_budget_min": None,
        "use_bn_in_head": False,
        "vit_depth": None,
        "warmup_epochs": 10,
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 30,
        "weight_decay_end": 0.4,
    },
}


def _plain(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_resolves_to_its_recorded_config(name):
    want = {**QUICKSTART, **DIFFERENCES.get(name, {}), "preset": name}
    assert _plain(preset(name).to_dict()) == want
    assert set(PRESETS) == {"quickstart", *DIFFERENCES}


def test_the_defaults_are_the_quickstart_recipe():
    assert _plain(TrainConfig().to_dict()) == QUICKSTART
    assert PRESETS["quickstart"] == {}


def test_a_config_saved_with_the_old_extra_field_still_loads():
    saved = {**TrainConfig().to_dict(), "extra": {}}
    assert TrainConfig.from_dict(saved) == TrainConfig()
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({**saved, "extra": {"x": 1}})
