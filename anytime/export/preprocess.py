"""Eval preprocessing for the export (numpy + pillow), driven by a bundle manifest's `input` block.

The geometry (channel conversion, shorter-side resize, centre crop) is `anytime.data.preprocess`'s
evaluation recipe, so the calibration logits and per-exit accuracies are those of the images the
trainer validated on; normalisation is the manifest's `(pixel / 255 - mean) / std` as float32 NCHW,
the arithmetic a runtime repeats from the manifest alone.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from anytime.data.preprocess import eval_preprocess


def input_steps(block: dict[str, Any]) -> list[str]:
    """The preprocessing as human-readable steps, written into the manifest for third parties."""
    h, w, short = block["height"], block["width"], block["resize"]
    return [
        f"convert to PIL mode {block['color']!r} ({block['channels']} channel(s)); RGB -> L is PIL's ITU-R 601-2 luma",
        f"if the shorter side is not {short}: resize it to {short} pixels ({block['interpolation']}), "
        "the longer side round(long * short_new / short_old)",
        f"centre-crop to {h}x{w} (height x width) at top = (H - {h}) // 2, left = (W - {w}) // 2",
        "x = pixel / 255, then x = (x - mean[c]) / std[c] per channel",
        "float32 array of shape (batch, channels, height, width)",
    ]


def preprocess_images(images: Iterable[np.ndarray], block: dict[str, Any]) -> np.ndarray:
    """uint8 images (H x W x C, any size) -> float32 N x C x H x W as the manifest's `input` block says."""
    channels, size = int(block["channels"]), (int(block["height"]), int(block["width"]))
    resize = block.get("resize")
    batch = [
        eval_preprocess(im if im.ndim == 3 else im[:, :, None], channels, size, None if resize is None else int(resize))
        for im in images
    ]
    if not batch:
        return np.zeros((0, channels, *size), dtype=np.float32)
    x = np.stack(batch).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(block["mean"], dtype=np.float32)
    std = np.asarray(block["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
