"""DINO self-distillation (Caron et al. 2021): backbones, method, training loop, export."""
