"""The synthesised segmentation dataset `shapes` (generated in memory, no files)."""
from __future__ import annotations

import logging
from typing import Tuple, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

from widetopo.constants import IGNORE_INDEX
from widetopo.data.base import DatasetInfo, SegmentationDataset, _square


SHAPE_CLASSES = ("background", "rectangle", "disc", "triangle")
_SHAPES_SIZES = {"train": 512, "test": 128}
_SHAPES_MEAN, _SHAPES_STD = (0.5031, 0.4979, 0.4997), (0.2292, 0.2331, 0.2343)  # of the 32 px train split


def _shape_coverage(kind: int, gx: np.ndarray, gy: np.ndarray, cx: float, cy: float, r: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Bool map of the sub-pixel centres (gx, gy) inside one shape of class `kind` centred at
    (cx, cy) with size r: an axis-aligned rectangle with half-sides in [0.6 r, r], a disc of
    radius r, or a triangle with vertices at distance r from the centre (random rotation)."""
    if kind == 1:
        hx, hy = r * rng.uniform(0.6, 1.0, size=2)
        return (np.abs(gx - cx) <= hx) & (np.abs(gy - cy) <= hy)
    if kind == 2:
        return (gx - cx) ** 2 + (gy - cy) ** 2 <= r * r
    angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.0, 4.0]) * np.pi / 3 + rng.uniform(-0.3, 0.3, size=3)
    return _in_triangle(gx, gy, cx + r * np.cos(angles), cy + r * np.sin(angles))


def _in_triangle(gx: np.ndarray, gy: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Points (gx, gy) inside the triangle with counter-clockwise vertices (vx[k], vy[k]): all
    three edge cross products (v_k+1 - v_k) x (g - v_k) are >= 0."""
    inside = np.ones(np.shape(gx), dtype=bool)
    for k in range(3):
        j = (k + 1) % 3
        inside &= (vx[j] - vx[k]) * (gy - vy[k]) - (vy[j] - vy[k]) * (gx - vx[k]) >= 0
    return inside


def synthesize_shapes(n: int, image_size: Union[int, Tuple[int, int]] = 32, seed: int = 0, split: str = "train",
                      max_shapes: int = 3, supersample: int = 4, noise: float = 0.08):
    """n SYNTHESISED segmentation samples: (uint8 images (n, 3, H, W), int64 masks (n, H, W)).

    Image i is drawn from np.random.default_rng([seed, split, i]) alone (split 0 = train,
    1 = test), so the first k images of a larger set are the k images of a smaller one. Each
    image: a background colour c0 ~ U[0.15, 0.85]^3, then 1..max_shapes shapes painted in
    order (later ones cover earlier ones) with a class in {1 rectangle, 2 disc, 3 triangle},
    centre ~ U[0.15, 0.85] * size, size r ~ U[0.12, 0.3] * min(H, W), and a colour at least
    0.3 away from c0 in some channel. Shapes are rendered on a grid of supersample^2
    sub-pixels per pixel; a pixel's colour is the mean of its sub-pixels plus N(0, noise^2)
    noise, and its label is the class its sub-pixels share - or IGNORE_INDEX when they
    disagree (the pixel is crossed by a shape border)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    s = supersample
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    split_code = {"train": 0, "test": 1}[split]
    gy, gx = np.meshgrid((np.arange(h * s) + 0.5) / s, (np.arange(w * s) + 0.5) / s, indexing="ij")
    images = np.empty((n, 3, h, w), dtype=np.uint8)
    masks = np.empty((n, h, w), dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, split_code, i])
        background = rng.uniform(0.15, 0.85, size=3)
        colour = np.broadcast_to(background[:, None, None], (3, h * s, w * s)).copy()
        label = np.zeros((h * s, w * s), dtype=np.int64)
        for _ in range(int(rng.integers(1, max_shapes + 1))):
            kind = int(rng.integers(1, 4))
            cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
            r = rng.uniform(0.12, 0.3) * min(h, w)
            inside = _shape_coverage(kind, gx, gy, cx, cy, r, rng)
            paint = rng.uniform(0.0, 1.0, size=3)
            while np.abs(paint - background).max() < 0.3:
                paint = rng.uniform(0.0, 1.0, size=3)
            colour[:, inside] = paint[:, None]
            label[inside] = kind
        blocks = label.reshape(h, s, w, s)
        lo, hi = blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))
        masks[i] = np.where(lo == hi, lo, IGNORE_INDEX)
        pixel = colour.reshape(3, h, s, w, s).mean(axis=(2, 4)) + rng.normal(0.0, noise, size=(3, h, w))
        images[i] = np.round(np.clip(pixel, 0.0, 1.0) * 255).astype(np.uint8)
    return images, masks


def _load_shapes(split, split_seed, image_size=None, max_samples=None, **_):
    size = 32 if image_size is None else image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < 4:
        raise ValueError(f"image_size must be at least 4 px for dataset 'shapes', got {image_size!r}")
    n = _SHAPES_SIZES[split] if max_samples is None else min(max_samples, _SHAPES_SIZES[split])
    images, masks = synthesize_shapes(n, (h, w), seed=split_seed, split=split)
    info = DatasetInfo("shapes", split, len(SHAPE_CLASSES), 3, _square(h, w), _SHAPES_MEAN, _SHAPES_STD,
                       SHAPE_CLASSES, f"synthesised (widetopo.data.synthesize_shapes, seed {split_seed})",
                       task="segmentation", ignore_index=IGNORE_INDEX)
    return SegmentationDataset(torch.from_numpy(images), torch.from_numpy(masks), info)
