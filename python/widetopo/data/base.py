"""The dataset classes shared by every source: an in-memory image set with per-channel
normalization, its segmentation variant, the loader, augmentation and split helpers."""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from widetopo.errors import DatasetNotFoundError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset (image_size is an int for square images,
    else (height, width))."""

    name: str
    split: str
    num_classes: int
    in_channels: int
    image_size: Union[int, Tuple[int, int]]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Tuple[str, ...] = ()
    source: str = ""
    task: str = "classification"  # or "segmentation": targets are (H, W) masks
    ignore_index: Optional[int] = None  # segmentation: target value of unlabelled pixels


class ImageDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 labels; item i is (normalized float32 image, label).

    The images stay uint8 in memory (CIFAR-10 train: 150 MB instead of 600 MB); normalization
    (and optional augmentation) happens per item, which is what a DataLoader expects.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, info: DatasetInfo,
                 scale: float = 1.0 / 255.0, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self._check_targets(images, targets)
        self.images = images
        self.targets = targets.to(torch.int64)
        self.info = info
        self.scale = float(scale)
        self.transform = transform
        c = images.shape[1]
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(c, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(c, 1, 1)

    @staticmethod
    def _check_targets(images: torch.Tensor, targets: torch.Tensor) -> None:
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")

    # what models need
    @property
    def task(self) -> str:
        return self.info.task

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def image_size(self) -> Union[int, Tuple[int, int]]:
        return self.info.image_size

    @property
    def classes(self) -> Tuple[str, ...]:
        return self.info.classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32 (pixel * scale - mean) / std."""
        return (images.to(torch.float32) * self.scale - self._mean) / self._std

    def __getitem__(self, index):
        x = self.normalize(self.images[index])
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All images normalized (no augmentation) and all labels, as two tensors."""
        return self.normalize(self.images), self.targets.clone()

    def subset(self, indices: Union[int, Sequence[int], torch.Tensor], seed: Optional[int] = None) -> "ImageDataset":
        """A new dataset with the given indices; an int n takes n samples - the first n, or
        the first n of a permutation seeded by `seed` when given."""
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 <= indices <= len(self):
                raise ValueError(f"indices: cannot take {indices} samples from a dataset of {len(self)}")
            if seed is None:
                idx = torch.arange(indices)
            else:
                gen = torch.Generator().manual_seed(int(seed))
                idx = torch.randperm(len(self), generator=gen)[:indices]
        else:
            idx = torch.as_tensor(indices, dtype=torch.int64)
        return type(self)(self.images[idx], self.targets[idx], self.info, self.scale, self.transform)

    def balanced_subset(self, per_class: int, seed: Optional[int] = None) -> "ImageDataset":
        """`per_class` samples of every class (the papers' pruning set: 10 images per class),
        the first ones of a permutation seeded by `seed` (dataset order without a seed), in
        that permutation's order. Classes with fewer samples give all they have."""
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
        if self.targets.dim() != 1:
            raise ValueError("a class-balanced subset needs one class per sample (not segmentation masks)")
        order = torch.arange(len(self)) if seed is None else torch.randperm(
            len(self), generator=torch.Generator().manual_seed(int(seed)))
        taken: Dict[int, int] = {}
        keep = []
        for i in order.tolist():
            c = int(self.targets[i])
            if taken.get(c, 0) < per_class:
                taken[c] = taken.get(c, 0) + 1
                keep.append(i)
        return self.subset(keep)

    def __repr__(self) -> str:
        i = self.info
        return (f"{type(self).__name__}({i.name!r}, split={i.split!r}, n={len(self)}, classes={i.num_classes}, "
                f"in_channels={i.in_channels}, image_size={i.image_size})")


class SegmentationDataset(ImageDataset):
    """uint8 images (N, C, H, W) and int64 masks (N, H, W); item i is (normalized float32 image,
    mask). Mask values are class indices in [0, num_classes) or info.ignore_index (pixels no
    loss should count: F.cross_entropy(logits, mask, ignore_index=ds.ignore_index))."""

    @staticmethod
    def _check_targets(images: torch.Tensor, targets: torch.Tensor) -> None:
        n, _, h, w = images.shape
        if targets.shape != (n, h, w):
            raise ValueError(f"targets must be masks of shape ({n}, {h}, {w}), got {tuple(targets.shape)}")

    @property
    def ignore_index(self) -> Optional[int]:
        return self.info.ignore_index


def data_loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, num_workers: int = 0, **kwargs) -> DataLoader:
    """A DataLoader yielding (x, y) batches; shuffling uses its own generator seeded by `seed`
    (reproducible, and the global RNG is not consumed)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last, num_workers=num_workers, **kwargs)


# --------------------------------------------------------------------------- helpers
class RandomCropFlip:
    """Train-time augmentation on a normalized (C, H, W) tensor: random crop after zero
    padding by `padding` pixels, and a horizontal flip with probability 1/2 if `flip`.
    Uses the global torch RNG (seeded per DataLoader worker by PyTorch)."""

    def __init__(self, padding: int, flip: bool):
        self.padding = int(padding)
        self.flip = bool(flip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding > 0:
            p = self.padding
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[..., top:top + h, left:left + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = torch.flip(x, dims=(-1,))
        return x


def _stratified_split(labels: np.ndarray, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """Indices of `split` in a per-class seeded split: of each class's n samples,
    round(n * test_fraction) go to test. Sorted, so the order is that of the source."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        perm = rng.permutation(idx)
        n_test = int(round(len(idx) * test_fraction))
        chosen.append(perm[:n_test] if split == "test" else perm[n_test:])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an idx file (the MNIST format; gzip-compressed if the name ends in .gz).

    Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), a byte with the number of dimensions d, d big-endian uint32
    sizes, then the values big-endian in C order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in types:
        raise ValueError(f"{path}: unknown idx element type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(types[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: idx data has {len(raw) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _square(h: int, w: int):
    return h if h == w else (h, w)


def _check_image_size(image_size) -> None:
    ok = (isinstance(image_size, int) and not isinstance(image_size, bool)) or (
        isinstance(image_size, (tuple, list)) and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size))
    if not ok:
        raise ValueError(f"image_size must be an int or an (height, width) pair, got {image_size!r}")


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _default_dirs(data_dir) -> list:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    dirs = []
    if os.environ.get("WIDETOPO_DATA_DIR"):
        dirs.append(Path(os.environ["WIDETOPO_DATA_DIR"]).expanduser())
    dirs.append(Path("data"))
    return dirs


# --------------------------------------------------------------------------- loaders
