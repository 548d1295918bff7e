"""Masked training: pruned weights stay exactly zero, prune-convention round trip, validation."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from arch_models import TiedLM
from widetopo.experiments.training import evaluate, fit, make_scheduler
from widetopo.sparsity.apply import MaskEnforcer, apply_masks, remove_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 4))


def tiny_masks(model, density=0.3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2}


def tiny_data(n=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return x, y


def run_steps(model, optimizer, steps, after_step=None):
    x, y = tiny_data()
    for i in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[i % 4 * 8:(i % 4 + 1) * 8]), y[i % 4 * 8:(i % 4 + 1) * 8]).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_enforcer_keeps_pruned_weights_exactly_zero(opt_name):
    model = tiny_net()
    masks = tiny_masks(model)
    opt = OPTIMIZERS[opt_name](model.parameters())
    enforcer = MaskEnforcer(model, masks, opt)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.all(params[n][~m] == 0), "pruned weights must be zeroed at construction"
    before = {n: params[n].detach().clone() for n in masks}
    run_steps(model, opt, 25)
    for n, m in masks.items():
        assert torch.all(params[n][~m] == 0)
        assert not torch.equal(params[n][m], before[n][m]), "kept weights must train"
        for key, value in opt.state[params[n]].items():
            if isinstance(value, torch.Tensor) and value.shape == m.shape:
                assert torch.all(value[~m] == 0), f"optimizer state {key} of pruned weights must be zero"
    enforcer.remove()


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adam"])
def test_without_enforcer_pruned_weights_are_revived(opt_name):
    """The control: zeroing once is not enough - training brings pruned weights back."""
    model = tiny_net()
    masks = tiny_masks(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    opt = OPTIMIZERS[opt_name](model.parameters())
    run_steps(model, opt, 10)
    params = dict(model.named_parameters())
    assert any(torch.any(params[n][~m] != 0) for n, m in masks.items())


def test_enforcer_matches_plain_pytorch_reference():
    """Kept weights follow the same trajectory as a loop that masks by hand with torch ops."""
    model = tiny_net()
    ref = copy.deepcopy(model)
    masks = tiny_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    MaskEnforcer(model, masks, opt, mask_grads=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    ref_params = dict(ref.named_parameters())

    def ref_mask_weights_and_state():
        with torch.no_grad():
            for n, m in masks.items():
                ref_params[n].mul_(m)
                buf = ref_opt.state.get(ref_params[n], {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(m)

    def ref_mask_grads(opt, args, kwargs):
        for n, m in masks.items():
            if ref_params[n].grad is not None:
                ref_params[n].grad.mul_(m)

    ref_mask_weights_and_state()
    ref_opt.register_step_pre_hook(ref_mask_grads)
    run_steps(ref, ref_opt, 15, after_step=ref_mask_weights_and_state)
    run_steps(model, opt, 15)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"parameter {n} differs")


def test_enforcer_mask_grads_and_manual_apply():
    model = tiny_net()
    masks = tiny_masks(model)
    enforcer = MaskEnforcer(model, masks)  # no optimizer: manual mode
    x, y = tiny_data()
    nn.functional.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    assert any(torch.any(params[n].grad[~m] != 0) for n, m in masks.items())
    enforcer.apply_to_grads()
    for n, m in masks.items():
        assert torch.all(params[n].grad[~m] == 0)
        assert torch.any(params[n].grad[m] != 0)
    with torch.no_grad():
        for n in masks:
            params[n].add_(1.0)
    enforcer.apply()
    for n, m in masks.items():
        assert torch.all(params[n][~m] == 0) and torch.all(params[n][m] != 0)


def test_enforcer_remove_detaches_hooks():
    model = tiny_net()
    masks = tiny_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    with MaskEnforcer(model, masks, opt):
        run_steps(model, opt, 2)
    run_steps(model, opt, 3)  # hooks gone: weights get revived
    params = dict(model.named_parameters())
    assert any(torch.any(params[n][~m] != 0) for n, m in masks.items())


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adam"])
def test_prune_convention_effective_weights_stay_zero(opt_name):
    model = tiny_net()
    masks = tiny_masks(model)
    apply_masks(model, masks)
    assert prune.is_pruned(model)
    names = dict(model.named_parameters())
    assert "0.weight_orig" in names and "0.weight" not in names
    assert torch.equal(model[0].weight_mask, masks["0.weight"].float())
    opt = OPTIMIZERS[opt_name](model.parameters())
    run_steps(model, opt, 20)
    x, _ = tiny_data()
    model(x)  # the pre-hook recomputes weight = weight_orig * weight_mask from the trained values
    for n, m in masks.items():
        module = model.get_submodule(n.rpartition(".")[0])
        assert torch.all(module.weight[~m] == 0)
        assert torch.any(module.weight_orig[~m] != 0), "weight_orig of pruned entries does move (hence the mask)"
        torch.testing.assert_close(module.weight, module.weight_orig * m, rtol=0, atol=0)


def test_prune_convention_round_trip_with_torch_remove():
    model = tiny_net()
    ref = copy.deepcopy(model)
    masks = tiny_masks(model)
    apply_masks(model, masks)
    x, _ = tiny_data()
    model.eval(), ref.eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in masks:
                p.mul_(masks[n])
        torch.testing.assert_close(model(x), ref(x))
    prune.remove(model[0], "weight")      # torch's own remove on one layer
    remove_masks(model)                    # ours on the rest
    assert not prune.is_pruned(model)
    assert sorted(dict(model.named_parameters())) == sorted(dict(ref.named_parameters()))
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert isinstance(p, nn.Parameter) and torch.equal(p, ref_params[n]), n
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert set(model.state_dict()) == set(ref.state_dict())


def test_masks_validated_with_clear_errors_and_model_untouched():
    model = tiny_net()
    before = copy.deepcopy(model.state_dict())
    good = tiny_masks(model)
    bad = dict(good)
    bad["0.weight"] = torch.ones(6, 2, 2, 2, dtype=torch.bool)
    bad["7.weight"] = torch.ones(3, dtype=torch.bool)
    bad["4.weight"] = good["4.weight"].float()
    for fn in (apply_masks, MaskEnforcer):
        with pytest.raises(ValueError) as info:
            fn(model, bad)
        text = str(info.value)
        assert "'0.weight'" in text and "[6, 2, 2, 2]" in text and "[6, 2, 3, 3]" in text
        assert "'7.weight' is not a parameter" in text
        assert "masks['4.weight'] must be a torch.bool tensor" in text
        assert not prune.is_pruned(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])
    with pytest.raises(TypeError, match="mapping"):
        apply_masks(model, [torch.ones(1, dtype=torch.bool)])
    with pytest.raises(TypeError, match="optimizer"):
        MaskEnforcer(model, good, optimizer="sgd")
    apply_masks(model, good)
    with pytest.raises(ValueError, match="already masked"):
        apply_masks(model, good)
    with pytest.raises(ValueError, match="not masked"):
        remove_masks(model, ["3.weight"])


def test_schedules():
    p = [nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(p, lr=1.0)
    sched = make_scheduler(opt, "cosine", 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(); sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    opt = torch.optim.SGD(p, lr=1.0)
    sched = make_scheduler(opt, "step", 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(); sched.step()
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="schedule"):
        make_scheduler(opt, "linear", 8)


@pytest.mark.parametrize("mode", ["enforcer", "prune"])
def test_fit_learns_under_masks(mode):
    x, y = tiny_data(64)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # learnable rule
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = tiny_net()
    masks = tiny_masks(model, density=0.5)
    start = evaluate(model, loader)
    out = fit(model, loader, loader, epochs=8, lr=0.05, masks=masks, mask_mode=mode)
    assert len(out["history"]) == 8
    assert out["final"]["accuracy"] > max(start["accuracy"], 0.8)
    assert not prune.is_pruned(model)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.all(params[n][~m] == 0)


# ---------------------------------------------------------------------------------------------
# tied parameters


def _tied_reference(model, mask, x):
    """The same network written out with the masked weight used at both places."""
    w = model.emb.weight_orig.detach() * mask if hasattr(model.emb, "weight_orig") else model.emb.weight.detach() * mask
    h = torch.tanh(torch.nn.functional.linear(w[x], model.mid.weight.detach(), model.mid.bias.detach()))
    return h.mean(1) @ w.T


def test_apply_masks_keeps_a_tie_and_masks_every_use():
    torch.manual_seed(0)
    model = TiedLM()
    mask = torch.rand(7, 4) > 0.5
    x = torch.randint(0, 7, (3, 5))
    apply_masks(model, {"emb.weight": mask})
    assert model.emb.weight_orig is model.head.weight_orig
    assert model.emb.weight_mask is model.head.weight_mask
    out = model(x)
    torch.testing.assert_close(out, _tied_reference(model, mask, x))
    # one parameter, gradients of both uses flow into it
    assert [n for n, _ in model.named_parameters()] == ["emb.weight_orig", "mid.weight", "mid.bias"]
    out.sum().backward()
    assert model.emb.weight_orig.grad is not None
    assert (model.emb.weight_orig.grad[~mask] == 0).all()
    # one SGD step keeps both uses identical and the pruned entries at zero in the forward
    with torch.no_grad():
        model.emb.weight_orig -= 0.1 * model.emb.weight_orig.grad
    model(x)
    assert torch.equal(model.emb.weight, model.head.weight)
    remove_masks(model, ["emb.weight"])
    assert model.head.weight is model.emb.weight
    assert not torch.nn.utils.prune.is_pruned(model.emb) and not torch.nn.utils.prune.is_pruned(model.head)
    assert (model.emb.weight[~mask] == 0).all()


def test_fit_in_prune_mode_keeps_the_tie():
    torch.manual_seed(0)
    model = TiedLM()
    mask = torch.rand(7, 4) > 0.5
    x = torch.randint(0, 7, (8, 5))
    y = torch.randint(0, 7, (8,))
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    fit(model, loader, epochs=1, lr=0.1, masks={"emb.weight": mask}, mask_mode="prune")
    assert model.head.weight is model.emb.weight
    assert (model.emb.weight[~mask] == 0).all()


def test_segmentation_accuracy_counts_labelled_pixels_only():
    """Per-pixel accuracy over the pixels whose target is not ignore_index, by hand."""
    from widetopo.experiments.training import evaluate

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.logits + 0 * self.dummy

    # 1 image, 2 classes, 2x2 pixels: predictions [[0, 1], [1, 1]]
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [2.0, 2.0]]]])
    target = torch.tensor([[[0, 0], [-100, 1]]])  # pixel (1, 0) unlabelled
    res = evaluate(Fixed(logits), [(torch.zeros(1, 1, 2, 2), target)])
    assert res["accuracy"] == pytest.approx(2 / 3)  # correct: (0,0) and (1,1); wrong: (0,1)
    ce = nn.functional.cross_entropy(logits, target, reduction="sum") / 3
    assert res["loss"] == pytest.approx(float(ce))
