"""Image loading and preprocessing with numpy and pillow, exactly as a bundle's `input` block says.

Every failure is an `InputImageError` with a message that names the file, the problem and the fix; the
batch caller turns it into an error row and goes on with the other images.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from anytime.data.preprocess import center_crop_offsets, shorter_side_size
from anytime.errors import InputImageError
from anytime.runtime.bundle import InputSpec

# Decoded pixels allowed per image (about 40 MP, 120 MB as RGB): larger headers are treated as
# decompression bombs and refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 40_000_000
# Files larger than this are not read into memory at all.
MAX_FILE_BYTES = 256 * 1024 * 1024

# 8-bit modes that convert unambiguously to L or RGB; others (I;16, I, F, ...) need a decision we
# cannot make for the user (what is white in a 16-bit image?).
ACCEPTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class Preprocessor:
    """Turns paths, PIL images and uint8 arrays into the network's normalised NCHW float32 input."""

    def __init__(self, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.spec = spec
        self.max_pixels = int(max_pixels)
        std = np.asarray(spec.std, dtype=np.float32)
        mean = np.asarray(spec.mean, dtype=np.float32)
        # (x/255 - mean)/std as one multiply-add per pixel.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (-mean / std).astype(np.float32)
        if spec.interpolation not in _RESAMPLE:
            raise InputImageError(
                f"bundle input interpolation {spec.interpolation!r} is unknown; expected one of {sorted(_RESAMPLE)}"
            )
        self._resample = _RESAMPLE[spec.interpolation]

    # --- single images to H×W×C uint8 -------------------------------------------------------------

    def open_path(self, path: str | os.PathLike) -> Image.Image:
        """Read, verify and decode an image file (fully loaded, so a truncated file fails here)."""
        p = Path(path)
        try:
            size = p.stat().st_size
        except FileNotFoundError as exc:
            raise InputImageError(f"{path}: file not found") from exc
        except OSError as exc:
            raise InputImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
        if not p.is_file():
            raise InputImageError(f"{path}: not a regular file")
        if size == 0:
            raise InputImageError(f"{path}: empty file (0 bytes); it holds no image")
        if size > MAX_FILE_BYTES:
            raise InputImageError(f"{path}: file is {size / 2**20:.0f} MiB, larger than the {MAX_FILE_BYTES / 2**20:.0f} MiB accepted for one image")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InputImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
        return self.decode_bytes(data, str(path))

    def decode_bytes(self, data: bytes, name: str = "<bytes>") -> Image.Image:
        with warnings.catch_warnings():
            # PIL warns (rather than fails) on large images; treat that as the bomb it may be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data)) as probe:
                    self._check_pixels(probe.size, name)
                    probe.verify()  # structure and checksums, without decoding pixels
                image = Image.open(io.BytesIO(data))
                self._check_pixels(image.size, name)
                image.load()  # decodes; raises on truncated data
            except InputImageError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InputImageError(f"{name}: refused as a possible decompression bomb ({exc})") from exc
            except UnidentifiedImageError as exc:
                raise InputImageError(f"{name}: not an image file pillow can read (unknown or damaged format)") from exc
            except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError, struct.error) as exc:
                msg = str(exc) or type(exc).__name__
                hint = " (the file looks truncated)" if "truncat" in msg.lower() else ""
                raise InputImageError(f"{name}: damaged image: {msg}{hint}") from exc
        return image

    def _check_pixels(self, size: tuple[int, int], name: str) -> None:
        w, h = size
        if w * h > self.max_pixels:
            raise InputImageError(
                f"{name}: image claims {w}×{h} = {w * h / 1e6:.0f} MP, more than the {self.max_pixels / 1e6:.0f} MP "
                "accepted (a possible decompression bomb); downscale it first"
            )
        if w <= 0 or h <= 0:
            raise InputImageError(f"{name}: image has no pixels ({w}×{h})")

    def to_array(self, item: Any, name: str = "<image>") -> np.ndarray:
        """One input (path, PIL image or H×W[×C] uint8 array) -> H×W×C uint8 of the model's size and color."""
        if isinstance(item, (str, os.PathLike)):
            image = self.open_path(item)
            return self._from_pil(image, str(item))
        if isinstance(item, Image.Image):
            return self._from_pil(item, name)
        if isinstance(item, np.ndarray):
            return self._from_numpy(item, name)
        raise InputImageError(
            f"{name}: cannot use an input of type {type(item).__name__}; give a path, a PIL image or a uint8 H×W×C numpy array"
        )

    def _from_pil(self, image: Image.Image, name: str) -> np.ndarray:
        spec = self.spec
        if image.mode not in ACCEPTED_MODES:
            raise InputImageError(
                f"{name}: image mode {image.mode!r} is not supported (this model takes 8-bit {spec.color}); "
                f"convert it to 8-bit {spec.color} first"
            )
        self._check_pixels(image.size, name)
        try:
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA")  # palette (maybe with transparency) -> plain pixels first
            if image.mode != spec.color:
                image = image.convert(spec.color)
            image = self._resize_crop(image, name)
            arr = np.asarray(image, dtype=np.uint8)
        except InputImageError:
            raise
        except (OSError, ValueError) as exc:
            raise InputImageError(f"{name}: cannot convert image: {exc}") from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr

    def _resize_crop(self, image: Image.Image, name: str) -> Image.Image:
        spec = self.spec
        w, h = image.size
        if spec.resize is None:
            if (h, w) != (spec.height, spec.width):
                raise InputImageError(
                    f"{name}: expected {spec.height}×{spec.width} (height×width), got {h}×{w}; this model's bundle "
                    "does not resize, so resize or crop the image to that size first"
                )
            return image
        if min(w, h) != spec.resize:
            # The training/export evaluation recipe's geometry (anytime.data.preprocess), so calibration
            # logits and served images see the same pixels.
            nh, nw = shorter_side_size(h, w, spec.resize)
            image = image.resize((nw, nh), self._resample)
            w, h = image.size
        if w < spec.width or h < spec.height:
            raise InputImageError(f"{name}: after resizing to {h}×{w} the image is smaller than the {spec.height}×{spec.width} crop")
        top, left = center_crop_offsets(h, w, (spec.height, spec.width))
        if (w, h) != (spec.width, spec.height):
            image = image.crop((left, top, left + spec.width, top + spec.height))
        return image

    def _from_numpy(self, arr: np.ndarray, name: str) -> np.ndarray:
        spec = self.spec
        if arr.dtype != np.uint8:
            raise InputImageError(
                f"{name}: array dtype is {arr.dtype}, expected uint8 pixels 0..255 "
                "(for floats in [0, 1] pass (x * 255).round().astype(np.uint8))"
            )
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise InputImageError(
                f"{name}: array shape {arr.shape} is not an image; expected H×W, H×W×1, H×W×3 or H×W×4 (or N×H×W×C for a batch)"
            )
        if arr.shape[2] == spec.channels and arr.shape[:2] == (spec.height, spec.width):
            return arr  # fast path: already the model's size and channel count
        if arr.shape[2] == 1 and spec.channels == 3 and arr.shape[:2] == (spec.height, spec.width):
            return np.repeat(arr, 3, axis=2)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
        image = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if mode == "L" else arr), mode=mode)
        return self._from_pil(image, name)

    # --- batches ----------------------------------------------------------------------------------

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        """N×H×W×C uint8 -> N×C×H×W float32, normalised."""
        x = batch.astype(np.float32) * self._scale + self._offset
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
