"""Help text for every ``training.run`` flag: what the field does and when to change it.

The default printed after each text is the preset's own value (``--preset``), listed per preset
where they differ, so ``python -m training.run --help`` answers "what will this run use?".
"""

from __future__ import annotations

# One line or two per field; DINO's own argparse is the model (say when a change helps).
FIELD_HELP: dict[str, str] = {
    # data
    "dataset": "fmnist, folder (--data DIR) or photos (the bundled scikit-image photos, no "
    "labels). Passing --data selects folder.",
    "data": "your images: a folder of class subfolders (labels feed the k-NN), train/ and val/ "
    "subfolders, or any folder of images (no k-NN).",
    "fmnist_dir": "folder with the Fashion-MNIST IDX files; change it when they are not in the "
    "Debian package's place.",
    "grayscale": "grey augmentation for one-channel data; set false for colour photos (--data "
    "turns it off for the quickstart).",
    "batch_augment": "cut the crops per batch on the training device: ~25x cheaper than "
    "per-image PIL crops for small grey images; false for colour data.",
    "num_workers": "loader processes per training process; raise it for photos decoded from "
    "files, keep 0 for in-memory data (every core then trains).",
    "threads": "torch threads per process; default (none): the cores the loader workers leave. "
    "More threads than free cores is far slower, not faster.",
    # model
    "arch": "backbone: vit_tiny, vit_small, vit_base, resnet18 or resnet50. Larger needs "
    "more data and time.",
    "patch_size": "ViT patch side in pixels; the crop sizes must be multiples of it. Smaller "
    "patches: more tokens, better features, quadratically slower.",
    "vit_depth": "ViT blocks (none: the arch's own 12). Lower it for tiny images or short runs.",
    "drop_path_rate": "stochastic depth of the student; helps long runs of large ViTs, hurts "
    "runs of a few hundred steps.",
    "out_dim": "prototypes of the DINO head. DINO uses 65536 on ImageNet; short runs on small "
    "data collapse with large values (the quickstart uses 256).",
    "head_hidden_dim": "hidden width of the head's 3-layer MLP.",
    "head_bottleneck_dim": "bottleneck width before the prototypes (DINO: 256).",
    "use_bn_in_head": "batch norm in the head's MLP; DINO uses it for ResNets, the quickstart "
    "for stability at small batch.",
    "norm_last_layer": "weight-normalise the prototypes; true is more stable for large ViTs, "
    "false learns faster (DINO's ViT-S recipe uses false).",
    # crops
    "global_size": "side of the 2 global crops (the training image size); a multiple of the "
    "patch size.",
    "local_size": "side of the local crops; a multiple of the patch size.",
    "global_scale": "area range (lo hi) of the global crops; raise lo if objects are small.",
    "local_scale": "area range (lo hi) of the local crops.",
    "n_local_crops": "local crops per image; more improves features at proportional cost (0 "
    "trains on the global crops only).",
    "mean": "normalisation mean (3 values, 0-1 scale) of your data; ImageNet's for photos.",
    "std": "normalisation std (3 values, 0-1 scale) of your data; ImageNet's for photos.",
    "eval_resize": "k-NN and served resize of the short side; DINO: 256 for a 224 crop.",
    "eval_crop": "k-NN and served centre crop; usually --global-size.",
    # optimisation
    "batch_size": "images per step over all processes; lower it on out-of-memory (--lr is per "
    "256 images and scales with it).",
    "epochs": "passes over the data the schedules span; a time budget compresses them.",
    "optimizer": "adamw (ViTs) or sgd (DINO's ResNet-50 recipe, momentum 0.9).",
    "lr": "peak learning rate per 256 images (scaled linearly with --batch-size). Lower it if "
    "the loss turns NaN.",
    "min_lr": "learning rate at the end of the cosine.",
    "warmup_epochs": "linear lr warm-up, in epochs (fractions allowed); longer if early steps "
    "diverge.",
    "weight_decay": "weight decay at the start (never on biases and norms).",
    "weight_decay_end": "weight decay at the end of its cosine (DINO: 0.4 for ViTs).",
    "momentum_teacher": "the teacher's EMA momentum at the start; lower (0.98) for short runs "
    "and small batches so the teacher keeps up.",
    "momentum_teacher_end": "momentum at the end of its cosine; 1 (DINO) freezes the teacher at "
    "the end, a little below 1 keeps it learning.",
    "clip_grad": "per-parameter gradient norm cap, as DINO; 0 disables (DINO's ResNet recipe).",
    "freeze_last_layer": "epochs during which the prototypes get no gradient; raise it if the "
    "loss does not fall at the start.",
    "warmup_teacher_temp": "teacher temperature at the start of its warm-up.",
    "teacher_temp": "teacher temperature after the warm-up; lower it if the teacher's entropy "
    "climbs towards ln(out_dim) (uniform collapse).",
    "warmup_teacher_temp_epochs": "epochs of the teacher temperature warm-up.",
    "teacher_centering": "ema: DINO's centre; sinkhorn: DINOv2's Sinkhorn-Knopp balancing.",
    "koleo_weight": "DINOv2's KoLeo term spreading the CLS tokens of a batch; 0: off. Did not "
    "help the quickstart over seeds.",
    "mim_weight": "iBOT's masked patch loss (ViTs only); 0: off. Improves patch features at "
    "~1.35x the step time.",
    "mim_ratio": "share (lo hi) of a masked image's patches that are hidden.",
    "mim_prob": "share of the global crops that are masked at all.",
    # run
    "precision": "auto: bf16 autocast on GPUs and CPUs with bf16 units, else fp32; fp32 for "
    "bit-comparable runs or if bf16 diverges.",
    "time_budget_min": "minutes for the whole run including k-NN and export: the schedules are "
    "compressed up front to fit (none: no budget, the full schedule).",
    "seed": "seeds weights, crops and data order; change it to measure the seed spread.",
    "log_every": "steps between metrics rows in metrics.jsonl.",
    "knn_every": "epochs between k-NN evaluations during training (0: only at the end); each "
    "costs a pass over the k-NN sets.",
    "knn_k": "neighbours that vote in the k-NN (DINO reports 20).",
    "knn_temperature": "k-NN vote weight exp(similarity / T), as DINO.",
    "knn_batch_size": "images per k-NN forward pass; lower it on out-of-memory.",
    "embedding_pooling": "the served embedding: cls (DINO's CLS token), patch_mean (mean of the "
    "patch tokens) or cls+patch_mean (both, twice the width); ViTs only for the latter two. The "
    "k-NN measures the same vector.",
    "embedding_centre": "subtract the mean embedding of the training images before L2 "
    "normalisation (scores of unrelated images near 0); fitted at the end of the run, carried "
    "by the export, reported by the k-NN beside the raw result.",
    "embedding_whiten": "also PCA-whiten the centred embedding to this many dimensions "
    "(implies centring; at most the embedding width); none: no whitening.",
    "export_name": "model name under --models-dir (none: the run folder's name).",
    "models_dir": "model store the export writes to (the server's DINO_MODELS_DIR).",
    "export_int8": "also export an int8 variant, kept only if it agrees with fp32 on photos.",
}


def _show(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value)
    return "none" if value is None else str(value)


def field_help(name: str, values: dict[str, object]) -> str:
    """``FIELD_HELP[name]`` plus the default per preset (``values``: preset -> value)."""
    distinct = {_show(v) for v in values.values()}
    if len(distinct) == 1:
        default = f"Default: {distinct.pop()}."
    else:
        default = "Default: " + ", ".join(f"{p} {_show(v)}" for p, v in values.items()) + "."
    return f"{FIELD_HELP[name]} {default}".replace("%", "%%")
