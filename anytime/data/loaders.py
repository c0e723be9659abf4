"""Batch loaders (torch): `make_loader(split, indices, ...)` -> iterable of (float32 N×C×H×W, int64 labels).

Determinism: the order of an epoch depends only on (seed, epoch) and the shard on (rank, world_size);
augmentation random numbers are derived from (seed, epoch, rank, batch or sample position). A resumed
run therefore sees exactly the batches it would have seen, whatever the number of DataLoader workers.

Sharding (world_size > 1): training uses DistributedSampler semantics — a permutation shared by all
ranks, padded by repeating its start to a multiple of world_size, rank r taking positions r, r+W, ...
(disjoint, equal-size shards). Evaluation (train=False) keeps the original order and does not pad, so
every image is counted exactly once (shards differ in size by at most one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from anytime.data.base import Split
from anytime.data.transforms import (
    ImageTransform,
    batch_transform,
    normalization_constants,
)
from anytime.errors import ConfigError

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def shard_positions(n: int, *, train: bool, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Positions (into the loader's indices) this rank visits in this epoch, in order."""
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        if world_size > 1 and n:
            total = math.ceil(n / world_size) * world_size
            order = np.resize(order, total)  # pads by repeating the permutation's start
        return order[rank::world_size]
    return np.arange(rank, n, world_size)


def _as_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size: tuple[int, ...]
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"image_size={image_size!r} is invalid; give an int or (height, width) of positive ints")
    return size[0], size[1]


class _BaseLoader:
    def __init__(
        self,
        split: Split,
        indices: Sequence[int] | np.ndarray | None,
        *,
        batch_size: int,
        train: bool,
        image_size: tuple[int, int],
        channels: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        pad: int,
        flip: bool,
        resize: int | None,
        part: tuple[int, int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
            raise ConfigError(f"part={part!r} is out of range; give (k, n) with 0 <= k < n")
        self.part = None if part is None else (int(part[0]), int(part[1]))
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is out of range for world_size={world_size}; need 0 <= rank < world_size")
        if channels not in (1, 3):
            raise ConfigError(f"channels={channels} is not supported; models take 1 (grey) or 3 (RGB) channels")
        if pad < 0:
            raise ConfigError(f"pad={pad} must be >= 0")
        self.split = split
        n_split = len(split)
        if indices is None:
            self.indices = np.arange(n_split, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n_split):
            raise ConfigError(f"loader index {int(self.indices.max())} is out of range for a split of {n_split} images")
        self.batch_size, self.train, self.image_size, self.channels = batch_size, train, image_size, channels
        self.seed, self.epoch, self.rank, self.world_size = int(seed), int(epoch), rank, world_size
        self.drop_last, self.pad, self.flip, self.resize = drop_last, pad, flip, resize

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch`'s order and augmentation on the next iteration (DistributedSampler style)."""
        self.epoch = int(epoch)

    def num_samples(self) -> int:
        """Images this rank sees per epoch (before drop_last)."""
        n = len(self.indices)
        if self.train:
            return math.ceil(n / self.world_size) if n else 0
        return len(range(self.rank, n, self.world_size))

    def _all_batches(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _part_range(self) -> range:
        """Numbers of the batches this loader yields: all of them, or the k-th of n contiguous parts."""
        total = self._all_batches()
        if self.part is None:
            return range(total)
        k, n = self.part
        return range(total * k // n, total * (k + 1) // n)

    def __len__(self) -> int:
        return len(self._part_range())

    def numbered_batches(self, epoch: int | None = None) -> list[tuple[int, np.ndarray]]:
        """(batch number within the epoch, split indices) of the batches this loader yields, in order.

        With `part=(k, n)` only the k-th of n contiguous runs of the epoch's batches: the n parts of one
        (seed, epoch) are disjoint and together cover the epoch, and each batch keeps the augmentation it
        has in the whole epoch.
        """
        batches = self.batch_indices(epoch)
        return [(number, batches[number]) for number in self._part_range()]

    def batch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """The split indices of every batch of a whole epoch, in order (ignores `part`)."""
        epoch = self.epoch if epoch is None else int(epoch)
        positions = shard_positions(
            len(self.indices), train=self.train, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size
        )
        chosen = self.indices[positions]
        batches = [chosen[i : i + self.batch_size] for i in range(0, len(chosen), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches


class ArrayLoader(_BaseLoader):
    """In-memory source: gathers each batch with one fancy index and augments it as a whole."""

    def __init__(self, split: Split, indices, *, mean, std, **kw) -> None:
        super().__init__(split, indices, **kw)
        self.scale, self.shift = normalization_constants(mean, std, self.channels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        for number, idx in self.numbered_batches(epoch):
            images, labels = self.split.get_batch(idx)
            rng = np.random.default_rng(derive_seed(self.seed, epoch, self.rank, number)) if self.train else None
            x = batch_transform(
                images,
                train=self.train,
                scale=self.scale,
                shift=self.shift,
                image_size=self.image_size,
                channels=self.channels,
                pad=self.pad,
                flip=self.flip,
                resize=self.resize,
                rng=rng,
            )
            yield x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


class _DecodedImages(torch.utils.data.Dataset):
    """Map-style dataset over (split index, augmentation seed) keys, decoding one image per key."""

    def __init__(self, split: Split, transform: ImageTransform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, aug_seed = key
        image, label = self.split[index]
        rng = np.random.default_rng(aug_seed) if self.transform.train else None
        return self.transform(image, rng), label


class ImageLoader(_BaseLoader):
    """Lazily decoded source (imagefolder): a torch DataLoader decoding per image, optionally in workers."""

    def __init__(self, split: Split, indices, *, mean, std, num_workers: int = 0, **kw) -> None:
        super().__init__(split, indices, **kw)
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be >= 0")
        self.num_workers = num_workers
        self.transform = ImageTransform(
            train=self.train, mean=mean, std=std, image_size=self.image_size, channels=self.channels,
            pad=self.pad, flip=self.flip, resize=self.resize,
        )  # fmt: skip

    def _keyed_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        keyed, position = [], 0
        for idx in self.batch_indices(epoch):
            batch = []
            for i in idx:
                # Seed per sample position, so results do not depend on which worker decodes it.
                aug = derive_seed(self.seed, epoch, self.rank, position) if self.train else 0
                batch.append((int(i), aug))
                position += 1
            keyed.append(batch)
        return [keyed[number] for number in self._part_range()]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            _DecodedImages(self.split, self.transform),
            batch_sampler=self._keyed_batches(self.epoch),
            num_workers=self.num_workers,
            collate_fn=_collate,
        )
        yield from loader


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


def make_loader(
    dataset_split: Split,
    indices: Sequence[int] | np.ndarray | None,
    *,
    batch_size: int,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | Sequence[int],
    channels: int,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
    pad: int = 4,
    flip: bool = True,
    resize: int | None = None,
    part: tuple[int, int] | None = None,
) -> ArrayLoader | ImageLoader:
    """Batches of `dataset_split[indices]` (all of it when `indices` is None) for a model's input.

    Yields `(float32 N×C×H×W normalised images, int64 labels)`; `len(loader)` is the number of batches.
    Augmentation (random crop from the `pad`-padded image, horizontal flip when `flip`) only when `train`.
    `mean`/`std` are per model channel (one value is broadcast). `resize` is the shorter side images are
    scaled to before the centre/random crop to `image_size` (None: only images of another size are scaled,
    to max(image_size)). In-memory splits are augmented batched on tensors in the calling process
    (`num_workers` is ignored); image folders are decoded per image by a DataLoader with `num_workers`.
    Call `loader.set_epoch(e)` (or pass `epoch`) to move to another epoch's order. `part=(k, n)` yields only
    the k-th of n contiguous runs of the epoch's batches (disjoint parts that together cover the epoch).
    """
    common = dict(
        batch_size=int(batch_size), train=bool(train), image_size=_as_image_size(image_size), channels=int(channels),
        seed=seed, epoch=epoch, rank=int(rank), world_size=int(world_size), drop_last=bool(drop_last),
        pad=int(pad), flip=bool(flip), resize=None if resize is None else int(resize), part=part,
    )  # fmt: skip
    if getattr(dataset_split, "in_memory", False):
        return ArrayLoader(dataset_split, indices, mean=mean, std=std, **common)
    return ImageLoader(dataset_split, indices, mean=mean, std=std, num_workers=int(num_workers), **common)
