"""Training augmentation and normalisation (torch).

Two flavours of the same recipe:
- batched, on uint8 N×H×W×C arrays, for in-memory sources (no per-image Python work);
- per image, on uint8 H×W×C arrays, for lazily decoded image folders (runs in DataLoader workers).

Recipe: channel conversion -> shorter-side resize when the source size differs from the model's ->
crop to the model's size (training: random crop from the image zero-padded by `pad` pixels; evaluation:
centre crop) -> horizontal flip with probability 1/2 (training, when `flip`) -> scale to [0, 1] and
normalise with the per-channel mean/std. Evaluation images are never augmented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from anytime.errors import ConfigError
from anytime.formats.preprocessing import (
    center_crop,
    center_crop_offsets,
    resize_shorter,
    resize_target,
    to_channels,
)


def normalization_constants(
    mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) so that x_uint8 * scale - shift == (x / 255 - mean) / std."""
    mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
    std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
    if len(mean_t) != len(std_t):
        raise ConfigError(f"mean has {len(mean_t)} values but std has {len(std_t)}; give one per channel")
    if len(mean_t) == 1 and channels > 1:
        mean_t, std_t = mean_t.repeat(channels), std_t.repeat(channels)
    if len(mean_t) != channels:
        raise ConfigError(
            f"mean/std have {len(mean_t)} values for a model with {channels} input channels; "
            "give one value per model channel (see anytime.data.channel_stats)"
        )
    if torch.any(std_t <= 0):
        raise ConfigError(f"std must be positive, got {std_t.tolist()}")
    return 1.0 / (255.0 * std_t), mean_t / std_t


def batch_resize_shorter(x: np.ndarray, short: int) -> np.ndarray:
    """Shorter-side resize of uint8 N×H×W×C with pillow's bilinear filter, image by image.

    Pillow (not torch.interpolate) so that training, evaluation and the torch-free runtime resize
    identically; at these sizes it costs ~20 µs per image.
    """
    h, w = x.shape[1:3]
    if min(h, w) == short:
        return x
    return np.stack([resize_shorter(image, short) for image in x])


def batch_crop_nchw(
    x: np.ndarray, crop: tuple[int, int], pad: int, rng: np.random.Generator | None, flip: bool = False
) -> np.ndarray:
    """Crop uint8 N×H×W×C to uint8 N×C×crop.

    With `rng`: at random offsets of the images zero-padded by `pad`, each mirrored left-right with
    probability 1/2 when `flip`; without: centred, never mirrored.
    """
    n, h, w, c = x.shape
    ch, cw = crop
    if rng is None:
        top, left = center_crop_offsets(h, w, crop)
        return np.ascontiguousarray(x[:, top : top + ch, left : left + cw].transpose(0, 3, 1, 2))
    # Channels-first before cropping, so that every copy below moves whole rows of pixels.
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), np.uint8)
    padded[:, :, pad : pad + h, pad : pad + w] = x.transpose(0, 3, 1, 2)
    span_h, span_w = padded.shape[2] - ch, padded.shape[3] - cw
    if span_h < 0 or span_w < 0:
        raise ConfigError(f"cannot crop {ch}×{cw} from {h + 2 * pad}×{w + 2 * pad} images; resize them first")
    top = rng.integers(0, span_h + 1, n)
    left = rng.integers(0, span_w + 1, n)
    mirror = rng.random((n,)) < 0.5 if flip else np.zeros(n, bool)
    # Strided views of every crop position (of the images and of their mirrors), then one gather each.
    windows = np.lib.stride_tricks.sliding_window_view(padded, (ch, cw), axis=(2, 3))
    out = np.empty((n, c, ch, cw), np.uint8)
    keep = np.flatnonzero(~mirror)
    out[keep] = windows[keep, :, top[keep], left[keep]]
    if mirror.any():
        mirrored = np.lib.stride_tricks.sliding_window_view(padded[..., ::-1], (ch, cw), axis=(2, 3))
        turn = np.flatnonzero(mirror)
        # The mirror of the crop at `left` is the crop at `span_w - left` of the mirrored image.
        out[turn] = mirrored[turn, :, top[turn], span_w - left[turn]]
    return out


def batch_transform(
    images: np.ndarray,
    *,
    train: bool,
    scale: torch.Tensor,
    shift: torch.Tensor,
    image_size: tuple[int, int],
    channels: int,
    pad: int = 4,
    flip: bool = True,
    resize: int | None = None,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """uint8 N×H×W×C images -> normalised float32 N×C×H×W tensor (augmented only when `train`).

    The uint8 work is done in numpy on purpose: on a busy machine torch's intra-op threads made these
    small ops ~50× slower, and numpy's single-threaded kernels are as fast as torch's at this size.
    """
    if train and rng is None:
        raise ConfigError("batch_transform(train=True) needs an rng for reproducible augmentation")
    x = np.asarray(images)
    # Grey -> RGB is left to the final broadcast (3× less uint8 work); RGB -> grey happens first.
    if not (x.shape[-1] == 1 and channels == 3):
        x = to_channels(x, channels)
    short = resize_target(tuple(x.shape[1:3]), image_size, resize)
    if short is not None:
        x = batch_resize_shorter(x, short)
    x = batch_crop_nchw(x, image_size, pad, rng, flip) if train else batch_crop_nchw(x, image_size, 0, None)
    # Broadcasting a 1-channel batch against 3-channel scale/shift replicates grey into RGB.
    out = np.multiply(x, scale.numpy()[:, None, None], dtype=np.float32)
    out -= shift.numpy()[:, None, None]
    return torch.from_numpy(out)


class ImageTransform:
    """Per-image version of `batch_transform` for decoded images (picklable for DataLoader workers)."""

    def __init__(
        self,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: tuple[int, int],
        channels: int,
        pad: int = 4,
        flip: bool = True,
        resize: int | None = None,
    ) -> None:
        # tuple(): a list from a config file becomes the (height, width) pair the annotation promises.
        self.train, self.image_size, self.channels = train, cast(tuple[int, int], tuple(image_size)), channels
        self.pad, self.flip, self.resize = pad, flip, resize
        self.scale, self.shift = normalization_constants(mean, std, channels)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = to_channels(image, self.channels)
        short = resize_target(image.shape[:2], self.image_size, self.resize)
        if short is not None:
            image = resize_shorter(image, short)
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            image = self._random_crop(image, rng)
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
        else:
            image = center_crop(image, self.image_size)
        out = np.multiply(image.transpose(2, 0, 1), self.scale.numpy()[:, None, None], dtype=np.float32)
        out -= self.shift.numpy()[:, None, None]
        return torch.from_numpy(out)

    def _random_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.pad:
            p = self.pad
            image = np.pad(image, ((p, p), (p, p), (0, 0)))
        ch, cw = self.image_size
        top = int(rng.integers(0, image.shape[0] - ch + 1))
        left = int(rng.integers(0, image.shape[1] - cw + 1))
        return image[top : top + ch, left : left + cw]
