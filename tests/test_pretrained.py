"""widetopo.experiments.pretrained.load_init: plain state_dicts, checkpoint dicts, clear mismatch errors."""
import hashlib

import pytest
import torch
from torch import nn

from widetopo.experiments.pretrained import InitMismatchError, load_init


def net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict", "model"])
def test_loads_plain_and_checkpoint_dicts(tmp_path, wrap):
    torch.manual_seed(0)
    src = net()
    src[1].running_mean.fill_(0.5)
    sd = src.state_dict()
    path = tmp_path / "init.pt"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    torch.manual_seed(1)
    dst = net()
    assert not same(src, dst)
    info = load_init(dst, path)
    assert same(src, dst)
    assert info["init_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["init_file"] == str(path.resolve())


def test_mismatch_lists_missing_unexpected_and_shapes_and_leaves_model(tmp_path):
    torch.manual_seed(0)
    sd = net().state_dict()
    del sd["2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    dst = net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(InitMismatchError) as info:
        load_init(dst, path)
    msg = str(info.value)
    assert "missing keys (1): 2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "0.weight: file [5, 3] vs model [4, 3]" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_init(net(), tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a torch.save file"):
        load_init(net(), junk)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, other)
    with pytest.raises(ValueError, match="without a state_dict.*epoch"):
        load_init(net(), other)
