"""Mask files: exact round trip, every corruption rejected, mismatches listed in full."""
import hashlib
import json
import struct

import pytest
import torch
from torch import nn

from widetopo.sparsity.maskfile import FORMAT_VERSION, MAGIC, MaskFileError, MaskMismatchError, load_masks, read_header, save_masks
from widetopo.sparsity.masks import Masks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))


def random_masks(model, density=0.3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    names = ["0.weight", "4.weight"]
    params = dict(model.named_parameters())
    return Masks({n: torch.rand(params[n].shape, generator=gen) < density for n in names},
                 meta={"method": "widetopo", "preset": "widetopo-s", "seed": 3, "density": density})


def test_round_trip_bits_and_meta_exact(tmp_path):
    model = small_model()
    masks = random_masks(model)
    path = tmp_path / "m.wtm"
    save_masks(masks, path, meta={"note": "hello", "rounds": [10, 10], "nested": {"a": 1.5}})
    loaded = load_masks(path)
    assert list(loaded.keys()) == list(masks.keys())
    for n in masks:
        assert loaded[n].dtype == torch.bool
        assert loaded[n].shape == masks[n].shape
        assert torch.equal(loaded[n], masks[n])
    meta = loaded.meta
    assert meta["method"] == "widetopo" and meta["preset"] == "widetopo-s" and meta["seed"] == 3
    assert meta["note"] == "hello" and meta["rounds"] == [10, 10] and meta["nested"] == {"a": 1.5}
    assert meta["format_version"] == FORMAT_VERSION
    import widetopo
    assert meta["package_version"] == widetopo.__version__
    header = read_header(path)
    kept = sum(int(m.sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    assert header["kept"] == kept and header["density"] == pytest.approx(kept / numel)
    assert {e["name"]: e["shape"] for e in header["entries"]} == {n: list(m.shape) for n, m in masks.items()}


def test_payload_is_little_endian_bit_packed(tmp_path):
    """Decode the file by hand (independent of load_masks): bit j of byte b = mask[8b + j]."""
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0], dtype=torch.bool).reshape(1, 11)
    path = tmp_path / "m.wtm"
    save_masks(Masks({"w": mask}, meta={}), path)
    data = path.read_bytes()
    assert data[:8] == MAGIC
    version, hlen = struct.unpack_from("<IQ", data, 8)
    assert version == FORMAT_VERSION
    header = json.loads(data[20:20 + hlen])
    payload = data[20 + hlen:-32]
    assert payload == bytes([0b00001101, 0b00000011])
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    assert header["entries"][0]["nbytes"] == 2


def test_empty_and_odd_sized_masks(tmp_path):
    masks = Masks({"a": torch.zeros(0, 3, dtype=torch.bool), "b": torch.ones(13, dtype=torch.bool),
                   "c": torch.tensor(True)}, meta={})
    save_masks(masks, tmp_path / "m")
    loaded = load_masks(tmp_path / "m")
    for n in masks:
        assert loaded[n].shape == masks[n].shape and torch.equal(loaded[n], masks[n])


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.wtm"
    save_masks(random_masks(small_model()), path)
    return path


@pytest.mark.parametrize("cut", [0, 3, 8, 15, 20, 40, -40, -33, -32, -1])
def test_truncated_file_is_an_error(good_file, tmp_path, cut):
    data = good_file.read_bytes()
    bad = tmp_path / "bad.wtm"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(MaskFileError):
        load_masks(bad)


def test_every_flipped_byte_is_an_error(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    bad = tmp_path / "bad.wtm"
    # every byte of the fixed prefix, a stride through header and payload, and the checksum
    positions = sorted(set(list(range(20)) + list(range(20, len(data), 7)) + list(range(len(data) - 32, len(data)))))
    for pos in positions:
        corrupted = bytearray(data)
        corrupted[pos] ^= 0x10
        bad.write_bytes(bytes(corrupted))
        with pytest.raises(MaskFileError):
            load_masks(bad)


def test_wrong_magic(good_file, tmp_path):
    data = good_file.read_bytes()
    bad = tmp_path / "bad.wtm"
    bad.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(MaskFileError, match="not a widetopo mask file"):
        load_masks(bad)
    bad.write_bytes(b"")
    with pytest.raises(MaskFileError, match="not a widetopo mask file"):
        load_masks(bad)


def test_unsupported_version_with_valid_checksum(good_file, tmp_path):
    data = bytearray(good_file.read_bytes()[:-32])
    struct.pack_into("<I", data, 8, FORMAT_VERSION + 1)
    bad = tmp_path / "future.wtm"
    bad.write_bytes(bytes(data) + hashlib.sha256(bytes(data)).digest())
    with pytest.raises(MaskFileError, match=f"version {FORMAT_VERSION + 1}"):
        load_masks(bad)


def test_consistent_checksum_but_lying_header_is_an_error(good_file, tmp_path):
    """Someone edits the header and recomputes the checksum: kept count no longer matches."""
    data = good_file.read_bytes()
    hlen = struct.unpack_from("<Q", data, 12)[0]
    header = json.loads(data[20:20 + hlen])
    header["entries"][0]["kept"] += 1
    hb = json.dumps(header).encode()
    body = data[:12] + struct.pack("<Q", len(hb)) + hb + data[20 + hlen:-32]
    bad = tmp_path / "lying.wtm"
    bad.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(MaskFileError, match="kept"):
        load_masks(bad)


def test_load_onto_fresh_model_moves_and_checks(good_file):
    fresh = small_model()
    loaded = load_masks(good_file, model=fresh)
    assert set(loaded) == {"0.weight", "4.weight"}


def test_mismatch_lists_all_differences(tmp_path):
    model = small_model()
    params = dict(model.named_parameters())
    masks = Masks({
        "0.weight": torch.ones(5, 3, 2, 2, dtype=torch.bool),   # wrong shape (model: 5,3,3,3)
        "9.weight": torch.ones(4, 4, dtype=torch.bool),         # not in the model
    }, meta={})
    # and 4.weight (Linear) is missing
    path = tmp_path / "m.wtm"
    save_masks(masks, path)
    with pytest.raises(MaskMismatchError) as info:
        load_masks(path, model=model)
    diffs = info.value.differences
    assert len(diffs) == 3
    text = str(info.value)
    assert "wrong shape" in text and "'0.weight'" in text and "[5, 3, 2, 2]" in text and "[5, 3, 3, 3]" in text
    assert "unexpected" in text and "'9.weight'" in text
    assert "missing" in text and "'4.weight'" in text and str(list(params["4.weight"].shape)) in text


def test_missing_allowed_when_not_strict(tmp_path):
    model = small_model()
    path = tmp_path / "m.wtm"
    save_masks(Masks({"0.weight": torch.ones(5, 3, 3, 3, dtype=torch.bool)}, meta={}), path)
    with pytest.raises(MaskMismatchError, match="missing"):
        load_masks(path, model=model)
    assert set(load_masks(path, model=model, strict=False)) == {"0.weight"}
    # a file from a run with a custom prunable selection is not strict by default
    save_masks(Masks({"0.weight": torch.ones(5, 3, 3, 3, dtype=torch.bool)}, meta={"selection": "{'pattern': '^0'}"}), path)
    assert set(load_masks(path, model=model)) == {"0.weight"}
    with pytest.raises(MaskMismatchError, match="missing"):
        load_masks(path, model=model, strict=True)


def test_bad_inputs_to_save(tmp_path):
    with pytest.raises(TypeError, match="bool"):
        save_masks({"w": torch.ones(3)}, tmp_path / "x")
    with pytest.raises(TypeError, match="mapping"):
        save_masks([torch.ones(3, dtype=torch.bool)], tmp_path / "x")
    with pytest.raises(TypeError, match="meta\\['obj'\\]"):
        save_masks({"w": torch.ones(3, dtype=torch.bool)}, tmp_path / "x", meta={"obj": object()})
    assert not (tmp_path / "x").exists()
