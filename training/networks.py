"""The student and teacher networks: a backbone with a DINO projection head on top."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.backbones import build_backbone
from training.config import TrainConfig
from training.distributed import DistInfo
from training.head import DINOHead, MultiCropWrapper


def build_network(cfg: TrainConfig, drop_path: bool) -> MultiCropWrapper:
    """Backbone + head as ``cfg`` describes them; ``drop_path`` only for the student."""
    backbone = build_backbone(
        cfg.arch, patch_size=cfg.patch_size, **cfg.backbone_kwargs(drop_path=drop_path)
    )
    head = DINOHead(
        backbone.embed_dim,
        cfg.out_dim,
        use_bn=cfg.use_bn_in_head,
        norm_last_layer=cfg.norm_last_layer,
        hidden_dim=cfg.head_hidden_dim,
        bottleneck_dim=cfg.head_bottleneck_dim,
    )
    # DINOv2/v3 backbones hold the official ``mask_token`` themselves.
    own_token = getattr(backbone, "mask_token", None) is not None
    mask_dim = backbone.embed_dim if cfg.mim_weight and not own_token else 0
    return MultiCropWrapper(backbone, head, mask_token_dim=mask_dim)


def build_student_teacher(
    cfg: TrainConfig, dist: DistInfo
) -> tuple[MultiCropWrapper, nn.Module, MultiCropWrapper]:
    """The student (plain, and as trained: DDP-wrapped across processes) and its frozen teacher,
    which starts as a copy of the student."""
    student = build_network(cfg, drop_path=True).to(dist.device)
    teacher = build_network(cfg, drop_path=False).to(dist.device)
    if dist.distributed and dist.device.type == "cuda" and cfg.arch.startswith("resnet"):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    trained: nn.Module = student
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        trained = DistributedDataParallel(student, device_ids=ids)
    # After the DDP wrap, which broadcast rank 0's weights: every teacher starts equal.
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, trained, teacher
