"""Every pruning method on every architecture of the papers: a ViT, torchvision-style ResNet-18
and MobileNetV3-small, an LSTM classifier and a U-Net segmentation net (tests/arch_models.py).
Each cell checks the two promises of widetopo.prune: masks with exactly K = round(d * N_P) kept
weights over the default prunable set (for a method that keeps whole kernels or graphs, RReg:
within its documented range, scorer.kept_bounds), and the caller's model unchanged (parameters,
buffers, train/eval mode of every module, no gradients left behind).

Known failures are listed in KNOWN_FAILURES (strict xfail: a cell that starts to work fails
the run, so the entry has to be removed with the fix).
"""
import pytest
import torch
from torch import nn

import widetopo
from widetopo.sparsity.selection import select_prunable

from arch_models import ARCHITECTURES, cell_options, kept_range, mobilenet_v3_small, resnet18, tiny_case
from references import reference_snip_ignore_index

pytestmark = pytest.mark.usefixtures("one_thread")

try:  # the method registry (widetopo.methods); the presets of widetopo.api before it
    from widetopo.methods import method_names

    METHODS = method_names()
except ImportError:
    from widetopo.api import METHODS as _PRESETS

    METHODS = sorted(_PRESETS)
DENSITY = 0.2

KNOWN_FAILURES = {}  # (architecture, method) -> reason; empty since attention and Hardsigmoid score twice-differentiably

#: documented refusals: the cell must raise this error before any work (model unchanged)
REFUSED = {
    # PX gates an activation a by its slope a(z)/z, which needs a(0) = 0; Hardsigmoid has a(0) = 1/2
    ("mobilenet_v3_small", "px"): (ValueError, "hardsigmoid"),
}


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
    }


def _assert_unchanged(model, before):
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after[key].detach(), value), f"{key} changed"
    assert [(name, m.training) for name, m in model.named_modules()] == before["modes"]
    assert [(name, id(p), p.requires_grad) for name, p in model.named_parameters()] == before["params"]
    assert all(p.grad is None for p in model.parameters())


def _cells():
    for arch in ARCHITECTURES:
        for method in METHODS:
            marks = []
            if (arch, method) in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True, raises=RuntimeError, reason=KNOWN_FAILURES[(arch, method)]))
            yield pytest.param(arch, method, marks=marks, id=f"{arch}-{method}")


@pytest.mark.parametrize("arch,method", list(_cells()))
def test_every_method_on_every_architecture(arch, method):
    model, batches = tiny_case(arch)
    model.train()
    if arch == "resnet18":
        model.layer1.eval()  # a mixed-mode model: every module's own flag must come back
    names = select_prunable(model)
    n_p = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    before = _snapshot(model)
    if (arch, method) in REFUSED:
        error, match = REFUSED[(arch, method)]
        with pytest.raises(error, match=match):
            widetopo.prune(model, batches, DENSITY, method=method, seed=0, verbose=False, **cell_options(method))
        _assert_unchanged(model, before)
        return
    masks = widetopo.prune(model, batches, DENSITY, method=method, seed=0, verbose=False, **cell_options(method))
    _assert_unchanged(model, before)
    assert list(masks) == names
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
    kept = sum(int(m.sum()) for m in masks.values())
    lo, hi = kept_range(method, [tuple(params[n].shape) for n in names], int(DENSITY * n_p + 0.5))
    assert lo <= kept <= hi


def test_segmentation_batches_carry_ignored_pixels():
    # the U-Net cells prune on masks with ignore_index pixels, so the loss-based methods see them
    _, batches = tiny_case("unet")
    y = torch.cat([b[1] for b in batches])
    assert y.dim() == 3 and (y == -100).any() and (y >= 0).any()


def test_snip_on_segmentation_ignores_border_pixels():
    """The U-Net x SNIP cell keeps the top-K of per-pixel cross-entropy saliencies that leave out
    the ignore_index pixels; counting those pixels as background picks a different mask."""
    model, batches = tiny_case("unet")
    # (eval-mode BatchNorm, as the reference; the default train mode is checked in test_method_snip.py)
    masks = widetopo.prune(model, batches, DENSITY, method="snip", batchnorm="eval", verbose=False)
    for ignore, should_match in ((-100, True), (None, False)):
        data = batches if ignore is not None else [(x, torch.where(y == -100, 0, y)) for x, y in batches]
        ref = reference_snip_ignore_index(model, data, -100)
        flat = torch.cat([ref[n].flatten() for n in masks])
        k = sum(int(m.sum()) for m in masks.values())
        threshold = flat.topk(k).values[-1]
        got = torch.cat([masks[n].flatten() for n in masks])
        differ = got != (flat >= threshold)
        near = (flat - threshold).abs() <= 1e-4 * threshold  # float32 vs float64 at the cut
        if should_match:
            assert not (differ & ~near).any()
        else:
            assert (differ & ~near).sum() > 10


# --------------------------------------------------------------------------- the reference models
def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet18_matches_torchvision_layout():
    model = resnet18()
    assert _count(model) == 11_689_512  # torchvision.models.resnet18(): 11,689,512 parameters
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [2, 2, 2, 2]
    assert model.layer1[0].downsample is None
    for layer, width in ((model.layer2, 128), (model.layer3, 256), (model.layer4, 512)):
        ds = layer[0].downsample
        assert ds[0].kernel_size == (1, 1) and ds[0].stride == (2, 2) and ds[0].out_channels == width
        assert isinstance(ds[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert resnet18(7, 1, width=4).eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_mobilenet_v3_small_matches_torchvision_layout():
    model = mobilenet_v3_small()
    assert _count(model) == 2_542_856  # torchvision.models.mobilenet_v3_small(): 2,542,856 parameters
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 11 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert sum(isinstance(m, nn.Hardsigmoid) for m in model.modules()) == 9  # one per SE block
    assert sum(isinstance(m, nn.Hardswish) for m in model.modules()) > 0
    small = mobilenet_v3_small(5, 2, width_mult=0.25, last_channel=32).eval()
    with torch.no_grad():
        assert small(torch.randn(2, 2, 16, 16)).shape == (2, 5)


def test_squeeze_excitation_against_formula():
    from arch_models import SqueezeExcitation

    torch.manual_seed(0)
    se = SqueezeExcitation(8, 4)
    x = torch.randn(2, 8, 3, 3)
    pooled = x.double().mean((2, 3))
    hidden = torch.relu(pooled @ se.fc1.weight.double().view(4, 8).T + se.fc1.bias.double())
    gate = hidden @ se.fc2.weight.double().view(8, 4).T + se.fc2.bias.double()
    gate = torch.clamp(gate / 6 + 0.5, 0, 1)  # hardsigmoid
    with torch.no_grad():
        torch.testing.assert_close(se(x).double(), x.double() * gate[:, :, None, None], rtol=1e-5, atol=1e-6)
