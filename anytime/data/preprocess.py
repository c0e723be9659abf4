"""Deterministic per-image preprocessing on uint8 H×W×C arrays (numpy + pillow, no torch).

This is the evaluation-time recipe the loaders apply (and the one a bundle's `input` section
describes): convert channels, resize the shorter side, centre-crop. The torch-free runtime can use
it to preprocess exactly as training evaluated.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from anytime.errors import ConfigError


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 H×W×C with `channels` channels: grey replicated to RGB; RGB to luma exactly as PIL's convert("L")."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        return rgb_to_luma(image)[..., None]
    raise ConfigError(f"cannot convert images with {have} channels to {channels}; supported: 1 <-> 3")


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma in PIL's fixed-point arithmetic (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def shorter_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) after resizing so that the shorter side is `short` (aspect ratio kept, long side rounded)."""
    if height <= width:
        return short, max(1, int(round(width * short / height)))
    return max(1, int(round(height * short / width))), short


def resize_shorter(image: np.ndarray, short: int) -> np.ndarray:
    """Resize (bilinear, antialiased by pillow) so the shorter side is `short`; no-op when it already is."""
    h, w = image.shape[:2]
    if min(h, w) == short:
        return image
    new_h, new_w = shorter_side_size(h, w, short)
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    return out[..., None] if channels == 1 else out


def center_crop_offsets(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    return (height - crop[0]) // 2, (width - crop[1]) // 2


def center_crop(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == tuple(crop):
        return image
    if h < crop[0] or w < crop[1]:
        raise ConfigError(f"cannot centre-crop {crop[0]}×{crop[1]} from a {h}×{w} image; resize it first")
    top, left = center_crop_offsets(h, w, crop)
    return image[top : top + crop[0], left : left + crop[1]]


def resize_target(image_hw: tuple[int, int], image_size: tuple[int, int], resize: int | None) -> int | None:
    """The shorter-side size to resize to, or None when no resize is needed.

    `resize=None` leaves images of exactly `image_size` alone and scales others so that the shorter side
    is max(image_size) (then a centre crop), so any image size reaches the model's input size.
    """
    if resize is not None:
        if resize < max(image_size):
            raise ConfigError(
                f"resize={resize} is smaller than the crop {image_size}; give resize >= {max(image_size)}"
            )
        return resize
    if tuple(image_hw) == tuple(image_size):
        return None
    return max(image_size)


def eval_preprocess(
    image: np.ndarray, channels: int, image_size: tuple[int, int], resize: int | None = None
) -> np.ndarray:
    """uint8 H×W×C -> uint8 image_size×channels: channel conversion, shorter-side resize, centre crop."""
    image = to_channels(image, channels)
    short = resize_target(image.shape[:2], image_size, resize)
    if short is not None:
        image = resize_shorter(image, short)
    return center_crop(image, image_size)
