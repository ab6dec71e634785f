"""Attention maps at patch resolution and DINO's threshold masks.

The model's ``attention`` output is the CLS row of the last block's softmax over patches only
(the CLS-to-CLS entry is left out), so each head is renormalised here to sum to 1.

Masks follow DINO's ``visualize_attention.py``: sort a head's attention ascending, take the
cumulative share, and keep the patches where it exceeds ``1 - threshold``. The kept patches are
the smallest top set holding at least ``threshold`` of the head's attention.
"""

from __future__ import annotations

import numpy as np


def patch_maps(attention: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[heads, h*w]`` CLS-to-patch attention -> float64 ``[heads, h, w]``, each summing to 1."""
    heads = attention.shape[0]
    h, w = grid
    if attention.shape[-1] != h * w:
        raise ValueError(f"attention has {attention.shape[-1]} patches, grid {h}x{w} has {h * w}")
    maps = attention.astype(np.float64).reshape(heads, h * w)
    totals = maps.sum(axis=1, keepdims=True)
    # A head with no mass at all (cannot happen after softmax) becomes uniform, not NaN.
    maps = np.where(totals > 0, maps / np.where(totals > 0, totals, 1.0), 1.0 / (h * w))
    return maps.reshape(heads, h, w)


def threshold_masks(maps: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean ``[heads, h, w]``: per head, keep the patches holding ``threshold`` of the mass."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within 0..1, got {threshold}")
    heads = maps.shape[0]
    flat = maps.reshape(heads, -1).astype(np.float64)
    order = np.argsort(flat, axis=1, kind="stable")  # ascending, as DINO sorts
    ascending = np.take_along_axis(flat, order, axis=1)
    share = np.cumsum(ascending / ascending.sum(axis=1, keepdims=True), axis=1)
    keep_sorted = share > 1.0 - threshold
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)  # back to patch order
    return keep.reshape(maps.shape)


def kept_share(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per head, the share of attention inside the mask (for checks and the PNG legend)."""
    heads = maps.shape[0]
    flat = maps.reshape(heads, -1)
    return (flat * masks.reshape(heads, -1)).sum(axis=1) / flat.sum(axis=1)
