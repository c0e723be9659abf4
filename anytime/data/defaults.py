"""Per-dataset defaults for the loaders (torch-free): augmentation and normalisation for a model's channels."""

from __future__ import annotations

from anytime.data.base import DatasetInfo

# Channel weights of ITU-R 601-2 luma (what PIL's convert("L") uses).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def default_augmentation(info: DatasetInfo) -> dict[str, int | bool]:
    """`pad` and `flip` keyword arguments for `make_loader` that suit the dataset.

    Small images (<= 32 px) get the usual 4-pixel padded random crop; larger ones (imagefolder, where the
    shorter-side resize already leaves room to crop) none. Handwritten digits (mnist) are not flipped:
    a mirrored digit is another glyph. Clothes (fashion-mnist), CIFAR and natural images are.
    """
    small = info.image_size is not None and max(info.image_size) <= 32
    return {"pad": 4 if small else 0, "flip": info.kind != "mnist"}


def channel_stats(info: DatasetInfo, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The dataset's mean/std expressed for a model taking `channels` channels.

    Grey to RGB replicates the single value. RGB to grey: the luma mean is exact (luma is linear); the
    std is the luma-weighted std, an upper bound that is exact when the channels move together.
    """
    mean, std = tuple(info.mean), tuple(info.std)
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:
        return mean * channels, std * channels
    if len(mean) == 3 and channels == 1:
        luma_mean = sum(w * m for w, m in zip(LUMA_WEIGHTS, mean))
        luma_std = sum(w * s for w, s in zip(LUMA_WEIGHTS, std))
        return (round(luma_mean, 6),), (round(luma_std, 6),)
    raise ValueError(f"cannot express {len(mean)}-channel statistics for a {channels}-channel model")
