"""How pixels become a network input: the one implementation (numpy + pillow, no torch).

Used by the dataset readers (decoding image folders), by training's evaluation transform (the geometry),
by the export (the manifest's `input` block and the calibration logits) and by the runtime (serving).

Per image, before any batching, always in this order:
1. decode (pillow), refusing empty, damaged, oversized files and decompression bombs;
2. apply the EXIF orientation tag (photos from phones and cameras are stored sideways with a tag);
3. convert to the model's colour: 16-bit greyscale (`I;16`) scaled to 8 bit, palette images through RGBA,
   RGB -> L with PIL's ITU-R 601-2 luma;
4. resize so the shorter side is `resize` (when it is not already), aspect ratio kept;
5. centre-crop to height x width;
6. x = (pixel / 255 - mean[c]) / std[c], float32 N x C x H x W.

Every failure is an `InputImageError` whose message names the file, the problem and the fix; batch callers
turn it into an error row and go on with the other images.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anytime.errors import ConfigError, InputImageError

# Decoded pixels allowed per image (about 40 MP, 120 MB as RGB): larger headers are treated as
# decompression bombs and refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 40_000_000
# Files larger than this are not read into memory at all.
MAX_FILE_BYTES = 256 * 1024 * 1024

# Modes that convert unambiguously to L or RGB. 16-bit greyscale is scaled to 8 bit (65535 -> 255);
# 32-bit integer and float images (I, F) need a decision we cannot make for the user (what is white?).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
ACCEPTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}) | SIXTEEN_BIT_MODES
GREY_MODES = frozenset({"1", "L", "LA"}) | SIXTEEN_BIT_MODES

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
COLORS = {"L": 1, "RGB": 3}


# --------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class PreprocessingSpec:
    """The manifest's `input` block: everything needed to turn an image into the network input."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None  # shorter side before the centre crop; None: images must already be height x width
    interpolation: str = "bilinear"
    crop: str = "center"
    name: str = "image"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"input channels {self.channels} is not supported; expected 1 (L) or 3 (RGB)")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError(
                f"input mean/std must have {self.channels} value(s) and std > 0, got {list(self.mean)}/{list(self.std)}"
            )
        if self.interpolation not in RESAMPLE:
            raise ValueError(
                f"input interpolation {self.interpolation!r} is unknown; expected one of {sorted(RESAMPLE)}"
            )
        if self.crop != "center":
            raise ValueError(f"input crop {self.crop!r} is not supported (only 'center')")
        if self.resize is not None and self.resize < max(self.height, self.width):
            raise ValueError(f"input resize {self.resize} is smaller than the {self.height}x{self.width} crop")

    @property
    def color(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    @classmethod
    def for_model(
        cls,
        channels: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        resize: int | None = None,
        interpolation: str = "bilinear",
    ) -> "PreprocessingSpec":
        """The spec of a trained model: one statistic broadcasts to all channels, as the training loaders
        allow; `resize` None becomes max(height, width), which is what the training loaders do with images
        of another size (images of the model's size are left alone either way)."""
        h, w = int(image_size[0]), int(image_size[1])
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean_t) == 1 and channels > 1:
            mean_t, std_t = mean_t * channels, std_t * channels
        return cls(int(channels), h, w, mean_t, std_t, int(resize) if resize is not None else max(h, w), interpolation)

    @classmethod
    def from_manifest(cls, block: dict[str, Any]) -> "PreprocessingSpec":
        try:
            spec = cls(
                channels=int(block["channels"]),
                height=int(block["height"]),
                width=int(block["width"]),
                mean=tuple(float(v) for v in block["mean"]),
                std=tuple(float(v) for v in block["std"]),
                resize=None if block.get("resize") is None else int(block["resize"]),
                interpolation=str(block.get("interpolation", "bilinear")),
                crop=str(block.get("crop", "center")),
                name=str(block.get("name", "image")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"the 'input' block is incomplete or malformed ({exc!r})") from exc
        color = block.get("color", spec.color)
        if color != spec.color:
            raise ValueError(f"input color {color!r} with {spec.channels} channel(s) is not supported")
        return spec

    def to_manifest(self) -> dict[str, Any]:
        block: dict[str, Any] = {
            "name": self.name, "channels": self.channels, "height": self.height, "width": self.width,
            "mean": list(self.mean), "std": list(self.std), "resize": self.resize, "crop": self.crop,
            "interpolation": self.interpolation, "layout": "NCHW", "dtype": "float32", "color": self.color,
            "exif_orientation": True,
        }  # fmt: skip
        block["steps"] = self.steps()
        return block

    def steps(self) -> list[str]:
        """The preprocessing as human-readable steps, written into the manifest for third parties."""
        h, w, short = self.height, self.width, self.resize
        resize = (
            f"if the shorter side is not {short}: resize it to {short} pixels ({self.interpolation}), the longer "
            "side round(long * short_new / short_old)"
            if short is not None
            else f"no resize: images must be {h}x{w}"
        )
        return [
            "decode; apply the EXIF orientation tag (PIL ImageOps.exif_transpose)",
            f"convert to PIL mode {self.color!r} ({self.channels} channel(s)); 16-bit greyscale is scaled to 8 bit "
            "(round(v / 257)); RGB -> L is PIL's ITU-R 601-2 luma",
            resize,
            f"centre-crop to {h}x{w} (height x width) at top = (H - {h}) // 2, left = (W - {w}) // 2",
            "x = pixel / 255, then x = (x - mean[c]) / std[c] per channel",
            "float32 array of shape (batch, channels, height, width)",
        ]


# ------------------------------------------------------------------------------------------- decoding
def check_pixels(size: tuple[int, int], name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    w, h = size
    if w * h > max_pixels:
        raise InputImageError(
            f"{name}: image claims {w}×{h} = {_pixels(w * h)}, more than the {_pixels(max_pixels)} "
            "accepted (a possible decompression bomb); downscale it first"
        )
    if w <= 0 or h <= 0:
        raise InputImageError(f"{name}: image has no pixels ({w}×{h})")


def _pixels(n: float) -> str:
    """64 MP, or 784 pixels below a megapixel (where MP rounded to 0)."""
    return f"{n / 1e6:.0f} MP" if n >= 1e6 else f"{int(n):,} pixels"


def check_bomb(size: tuple[int, int], name: str) -> None:
    """PIL's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`), refused as an error. PIL only warns
    between that limit and twice it; turning the warning into an error with `warnings.catch_warnings` is not
    an option, since that saves and restores the process-wide filter list: decode threads interleaving
    removed the filter under one another (a bomb passed) and left it set in the process for good."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = size
    if limit is not None and max(1, w) * max(1, h) > limit:
        raise InputImageError(
            f"{name}: refused as a possible decompression bomb (image claims {w}×{h} = {_pixels(w * h)}, more than "
            f"PIL's Image.MAX_IMAGE_PIXELS, {_pixels(limit)})"
        )


def decode_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Verify and decode an encoded image (fully loaded, so truncated data fails here)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            check_pixels(probe.size, name, max_pixels)
            check_bomb(probe.size, name)
            probe.verify()  # structure and checksums, without decoding pixels
        image = Image.open(io.BytesIO(data))  # the same bytes: the size checked above
        image.load()  # decodes; raises on truncated data
    except InputImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # the warning: where the process's own filters make it an error
        raise InputImageError(f"{name}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputImageError(f"{name}: not an image file pillow can read (unknown or damaged format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError, struct.error) as exc:
        msg = str(exc) or type(exc).__name__
        hint = " (the file looks truncated)" if "truncat" in msg.lower() else ""
        raise InputImageError(f"{name}: damaged image: {msg}{hint}") from exc
    return image


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read, verify and decode an image file."""
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
        raise InputImageError(
            f"{path}: file is {size / 2**20:.0f} MiB, larger than the {MAX_FILE_BYTES / 2**20:.0f} MiB accepted for one image"
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return decode_bytes(data, str(path), max_pixels)


def to_color(image: Image.Image, color: str, name: str = "<image>") -> Image.Image:
    """EXIF orientation applied and converted to `color` ("L" or "RGB")."""
    if image.mode not in ACCEPTED_MODES:
        raise InputImageError(
            f"{name}: image mode {image.mode!r} is not supported (this model takes 8-bit {color}); "
            f"convert it to 8-bit {color} first"
        )
    try:
        image = ImageOps.exif_transpose(image) or image
        if image.mode in SIXTEEN_BIT_MODES:
            wide = np.asarray(image, dtype=np.uint16)
            image = Image.fromarray(((wide.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette (maybe with transparency) -> plain pixels first
        if image.mode != color:
            image = image.convert(color)
    except (OSError, ValueError) as exc:
        raise InputImageError(f"{name}: cannot convert image: {exc}") from exc
    return image


def decode_file(path: str | os.PathLike, color: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file as uint8 H×W×C in `color`, oriented and converted (the dataset readers' decoder)."""
    return pil_to_array(to_color(open_image(path, max_pixels), color, str(path)))


def pil_to_array(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


# ------------------------------------------------------------------------------------------- geometry
def shorter_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(H, W) after resizing so that the shorter side is `short` (aspect ratio kept, long side rounded)."""
    if height <= width:
        return short, max(1, int(round(width * short / height)))
    return max(1, int(round(height * short / width))), short


def center_crop_offsets(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    return (height - crop[0]) // 2, (width - crop[1]) // 2


def resize_crop(image: Image.Image, spec: PreprocessingSpec, name: str = "<image>") -> Image.Image:
    """Steps 4 and 5 on a PIL image already in the model's colour."""
    w, h = image.size
    if spec.resize is None:
        if (h, w) != spec.size:
            raise InputImageError(
                f"{name}: expected {spec.height}×{spec.width} (height×width), got {h}×{w}; this model's bundle "
                "does not resize, so resize or crop the image to that size first"
            )
        return image
    if min(w, h) != spec.resize:
        nh, nw = shorter_side_size(h, w, spec.resize)
        image = image.resize((nw, nh), RESAMPLE[spec.interpolation])
        w, h = image.size
    if w < spec.width or h < spec.height:
        raise InputImageError(
            f"{name}: after resizing to {h}×{w} the image is smaller than the {spec.height}×{spec.width} crop"
        )
    if (w, h) != (spec.width, spec.height):
        top, left = center_crop_offsets(h, w, spec.size)
        image = image.crop((left, top, left + spec.width, top + spec.height))
    return image


# Numpy forms of the same geometry, for training's batched transforms (arrays already decoded).
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


def resize_shorter(image: np.ndarray, short: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize uint8 H×W×C (pillow, antialiased) so the shorter side is `short`; no-op when it already is."""
    h, w = image.shape[:2]
    if min(h, w) == short:
        return image
    new_h, new_w = shorter_side_size(h, w, short)
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((new_w, new_h), RESAMPLE[interpolation]))
    return out[..., None] if channels == 1 else out


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
    image: np.ndarray,
    channels: int,
    image_size: tuple[int, int],
    resize: int | None = None,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """uint8 H×W×C -> uint8 image_size×channels: channel conversion, shorter-side resize, centre crop."""
    image = to_channels(image, channels)
    short = resize_target(image.shape[:2], image_size, resize)
    if short is not None:
        image = resize_shorter(image, short, interpolation)
    return center_crop(image, image_size)


# ------------------------------------------------------------------------------------------ the whole
def is_binary_file(item: Any) -> bool:
    """An open file object (or BytesIO) to read one encoded image from: it has `read`."""
    return callable(getattr(item, "read", None)) and not isinstance(item, (str, bytes, os.PathLike))


class Preprocessor:
    """Turns paths, encoded bytes, PIL images and uint8 arrays into the network's normalised NCHW input."""

    def __init__(self, spec: PreprocessingSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.spec = spec
        given: Any = max_pixels  # callers pass what they have: None, 0, a float, a numpy integer
        if isinstance(given, bool) or not isinstance(given, numbers.Real) or not 1 <= float(given) < math.inf:
            raise ConfigError(
                f"max_pixels={max_pixels!r}: give the most pixels an input image may have, a positive number "
                f"(default {DEFAULT_MAX_PIXELS:,}); larger images are refused as possible decompression bombs"
            )
        self.max_pixels = int(max_pixels)
        std = np.asarray(spec.std, dtype=np.float32)
        mean = np.asarray(spec.mean, dtype=np.float32)
        # (x/255 - mean)/std as one multiply-add per pixel.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (-mean / std).astype(np.float32)

    def open_path(self, path: str | os.PathLike) -> Image.Image:
        return open_image(path, self.max_pixels)

    def decode_bytes(self, data: bytes, name: str = "<bytes>") -> Image.Image:
        return decode_bytes(data, name, self.max_pixels)

    def to_array(self, item: Any, name: str = "<image>") -> np.ndarray:
        """One input (path, encoded bytes or a binary file object holding them, PIL image or H×W[×C] uint8
        array) -> H×W×C uint8 of the model's size."""
        if isinstance(item, (str, os.PathLike)):
            return self._from_pil(self.open_path(item), str(item))
        if is_binary_file(item):
            if isinstance(item, io.TextIOBase):
                raise InputImageError(f"{name}: a text-mode file object; open the image in binary mode ('rb')")
            try:
                item = item.read()
            except (OSError, ValueError) as exc:  # ValueError: a closed file
                raise InputImageError(f"{name}: cannot read the file object: {exc}") from exc
            if not isinstance(item, (bytes, bytearray)):
                raise InputImageError(
                    f"{name}: the file object gave {type(item).__name__}, not bytes; open it in 'rb' mode"
                )
        if isinstance(item, (bytes, bytearray, memoryview)):
            return self._from_pil(self.decode_bytes(bytes(item), name), name)
        if isinstance(item, Image.Image):
            return self._from_pil(item, name)
        if isinstance(item, np.ndarray):
            return self._from_numpy(item, name)
        raise InputImageError(
            f"{name}: cannot use an input of type {type(item).__name__}; give a path, a PIL image or a uint8 H×W×C numpy array"
        )

    def _from_pil(self, image: Image.Image, name: str) -> np.ndarray:
        check_pixels(image.size, name, self.max_pixels)
        image = to_color(image, self.spec.color, name)
        try:
            image = resize_crop(image, self.spec, name)
        except (OSError, ValueError) as exc:
            if isinstance(exc, InputImageError):
                raise
            raise InputImageError(f"{name}: cannot resize image: {exc}") from exc
        return pil_to_array(image)

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
        if arr.shape[2] == spec.channels and arr.shape[:2] == spec.size:
            return arr  # fast path: already the model's size and channel count
        if arr.shape[2] == 1 and spec.channels == 3 and arr.shape[:2] == spec.size:
            return np.repeat(arr, 3, axis=2)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
        image = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if mode == "L" else arr), mode=mode)
        return self._from_pil(image, name)

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        """N×H×W×C uint8 -> N×C×H×W float32, normalised."""
        x = batch.astype(np.float32) * self._scale + self._offset
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
