"""Trainer callbacks (widetopo.integrations): Lightning's Trainer and Hugging Face's Trainer, each
with the real library, a tiny model and 2 training steps.

References written here: the Lightning run is compared with SGD (momentum, weight decay) written
out by hand in float64 on the same two batches, masking weights and momentum after each step;
the Hugging Face run with a second Trainer whose test-written callback zeroes the pruned weights
and Adam's moments with plain indexing after each optimizer step (BERT's dropout is on, so the
two agree only if pruning left the random state alone).
"""
import copy
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import widetopo
from widetopo.integrations.common import DEFAULT_SAMPLES, PruneAtStart

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).resolve().parents[1]
LR, MOMENTUM, WD = 0.1, 0.9, 0.01
DENSITY = 0.3


# ---------------------------------------------------------------------------------------------
# Lightning

def _lightning():
    return pytest.importorskip("lightning.pytorch", reason='needs Lightning: pip install "widetopo[lightning]"')


def _tiny_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def _lightning_module(pl):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

    torch.manual_seed(0)
    return Tiny()


def _trainer(pl, callback, max_steps=2, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **kw)


def _loader(x, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _reference_sgd(init, masks, batches):
    """Two steps of SGD(lr, momentum, weight_decay) in float64 on Linear-ReLU-Linear, the pruned
    weights and their momentum set to zero after each step (and the weights before the first)."""
    w = {n: t.detach().double().clone() for n, t in init.items()}
    m = {n: masks[n] for n in ("net.0.weight", "net.2.weight")}
    for n in m:
        w[n][~m[n]] = 0
    buf = {}
    for step, (x, y) in enumerate(batches):
        params = {n: t.clone().requires_grad_(True) for n, t in w.items()}
        h = torch.relu(x.double() @ params["net.0.weight"].T + params["net.0.bias"])
        out = h @ params["net.2.weight"].T + params["net.2.bias"]
        loss = nn.functional.cross_entropy(out, y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        for n in w:
            g = grads[n] + WD * w[n]
            buf[n] = g.clone() if step == 0 else MOMENTUM * buf[n] + g
            w[n] = w[n] - LR * buf[n]
            if n in m:
                w[n][~m[n]] = 0
                buf[n][~m[n]] = 0
    return w, buf


def test_lightning_prunes_at_fit_start_and_keeps_pruned_weights_and_momentum_zero(tmp_path):
    pl = _lightning()
    from widetopo.integrations.lightning import WidetopoPruning

    x, y = _tiny_data()
    module = _lightning_module(pl)
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    path = tmp_path / "masks.wtm"
    callback = WidetopoPruning(DENSITY, "snip", batches=2, save_path=path, verbose=False)
    assert isinstance(callback, pl.Callback)
    trainer = _trainer(pl, callback)
    trainer.fit(module, _loader(x, y))
    assert trainer.global_step == 2

    masks = callback.masks
    # the two Linear weights are the prunable set: 60 + 30 = 90 weights, round(0.3 * 90) = 27 kept
    assert sorted(masks) == ["net.0.weight", "net.2.weight"]
    assert sum(int(m.sum()) for m in masks.values()) == 27
    # pruned on the first two batches of the training loader (the same call on them by hand)
    fresh = _lightning_module(pl)
    by_hand = widetopo.prune(fresh, [(x[:4], y[:4]), (x[4:8], y[4:8])], DENSITY, "snip", verbose=False)
    assert all(torch.equal(masks[n], by_hand[n]) for n in masks)
    saved = widetopo.load_masks(path)
    assert all(torch.equal(saved[n], masks[n]) for n in masks)

    params = dict(module.named_parameters())
    state = trainer.optimizers[0].state
    for n, m in masks.items():
        assert torch.count_nonzero(params[n][~m]) == 0, n
        assert torch.count_nonzero(state[params[n]]["momentum_buffer"][~m]) == 0, n
        # weight decay moves every kept weight, so each one changed
        assert bool((params[n][m] != init[n][m]).all()), n

    # the model trained otherwise normally: SGD written out by hand on the same two batches
    w, buf = _reference_sgd(init, masks, [(x[:4], y[:4]), (x[4:8], y[4:8])])
    for n, p in params.items():
        torch.testing.assert_close(p.detach().double(), w[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(state[p]["momentum_buffer"].double(), buf[n], rtol=0, atol=1e-6)
    # after fit the optimizer hooks are gone
    assert callback.enforcers == []


def test_lightning_resume_keeps_the_checkpointed_masks(tmp_path, monkeypatch):
    pl = _lightning()
    from widetopo.integrations.lightning import WidetopoPruning

    x, y = _tiny_data()
    first = WidetopoPruning(DENSITY, "magnitude", verbose=False)
    trainer = _trainer(pl, first)
    trainer.fit(_lightning_module(pl), _loader(x, y))
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    def no_pruning(*args, **kwargs):
        raise AssertionError("a resumed run pruned again")

    monkeypatch.setattr(widetopo, "prune", no_pruning)
    second = WidetopoPruning(DENSITY, "magnitude", verbose=False)
    resumed = _trainer(pl, second, max_steps=3)
    module = _lightning_module(pl)
    resumed.fit(module, _loader(x, y), ckpt_path=ckpt)
    assert resumed.global_step == 3
    assert second.masks is not None and sorted(second.masks) == sorted(first.masks)
    params = dict(module.named_parameters())
    for n, m in first.masks.items():
        assert torch.equal(second.masks[n], m)
        assert torch.count_nonzero(params[n][~m]) == 0
        assert torch.count_nonzero(resumed.optimizers[0].state[params[n]]["momentum_buffer"][~m]) == 0


def test_standalone_pytorch_lightning_gets_its_own_callback_class():
    ptl = pytest.importorskip("pytorch_lightning", reason="the standalone package is not installed")
    pl = _lightning()
    from widetopo.integrations.lightning import WidetopoPruning, callback_class

    standalone = callback_class(ptl)
    assert issubclass(standalone, ptl.Callback) and issubclass(WidetopoPruning, pl.Callback)
    assert callback_class(ptl) is standalone and callback_class(pl) is WidetopoPruning


def test_lightning_submodule_and_bad_module_name_leaves_the_model_alone():
    pl = _lightning()
    from widetopo.integrations.lightning import WidetopoPruning

    x, y = _tiny_data()
    callback = WidetopoPruning(DENSITY, "magnitude", module="net", verbose=False)
    module = _lightning_module(pl)
    _trainer(pl, callback).fit(module, _loader(x, y))
    assert sorted(callback.masks) == ["0.weight", "2.weight"]  # names relative to module.net

    module = _lightning_module(pl)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(ValueError, match="module='nope' is not a submodule"):
        _trainer(pl, WidetopoPruning(DENSITY, "magnitude", module="nope", verbose=False)).fit(module, _loader(x, y))
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


# ---------------------------------------------------------------------------------------------
# settings are checked when the callback is made

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bogus=1, other=2), ValueError, r"unknown option\(s\) \['bogus', 'other'\] for method 'snip'"),
    (dict(density=0.0), ValueError, r"density must be in \(0, 1\]"),
    (dict(rounds=0), ValueError, "rounds"),
    (dict(batches=0), ValueError, "batches must be a positive integer"),
    (dict(data=torch.zeros(3, 6)), TypeError, "data must be an iterable of batches"),
    (dict(save_path="/no/such/folder/m.wtm"), ValueError, "does not exist"),
    (dict(masks={"w": torch.ones(3)}), TypeError, "must be a torch.bool tensor"),
    (dict(mask_grads="yes"), TypeError, "mask_grads must be True or False"),
])
def test_bad_settings_are_refused_at_construction(kwargs, error, match):
    kwargs = {"density": DENSITY, "method": "snip", **kwargs}
    with pytest.raises(error, match=match):
        PruneAtStart(**kwargs)


class _Jittered(torch.utils.data.Dataset):
    """Samples with an augmentation that draws from Python's and NumPy's global generators."""

    def __init__(self):
        self.x, self.y = _tiny_data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import random

        import numpy as np

        return self.x[i] * (1 + 0.1 * random.random() + 0.1 * float(np.random.rand())), self.y[i]


def _random_states():
    import random

    import numpy as np

    return torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[1] == b[1] and (a[2] == b[2]).all()


def test_pruning_leaves_the_global_random_states_as_they_were():
    loader = torch.utils.data.DataLoader(_Jittered(), batch_size=4, shuffle=True)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 3))
    # reading the loader draws from the torch, Python and NumPy generators ...
    before = _random_states()
    next(iter(loader))
    after = _random_states()
    assert not torch.equal(after[0], before[0]) and after[1] != before[1] and not (after[2] == before[2]).all()
    # ... but not when the callback prunes from it
    before = _random_states()
    core = PruneAtStart(DENSITY, "snip", batches=2, verbose=False)
    core.prune(model, loader)
    assert _same(_random_states(), before)
    assert core.masks is not None


def test_default_pruning_set_is_the_first_default_samples_of_the_training_data():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(DEFAULT_SAMPLES + 24, 6, generator=g), torch.randint(0, 3, (DEFAULT_SAMPLES + 24,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    core = PruneAtStart(DENSITY, "snip", verbose=False)
    masks = core.prune(model, _loader(x, y))
    first = widetopo.prune(model, _loader(x[:DEFAULT_SAMPLES], y[:DEFAULT_SAMPLES]), DENSITY, "snip", verbose=False)
    assert DEFAULT_SAMPLES == 1000 and all(torch.equal(masks[n], first[n]) for n in first)


def test_one_enforcer_per_optimizer_for_the_parameters_it_updates():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    x, y = _tiny_data()
    core = PruneAtStart(DENSITY, "magnitude", verbose=False)
    masks = core.prune(model, _loader(x, y))
    first = torch.optim.SGD(model[0].parameters(), lr=LR, momentum=MOMENTUM)
    second = torch.optim.Adam(model[2].parameters(), lr=LR)
    core.attach(model, [first, second])
    assert len(core.enforcers) == 2
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        first.step(), second.step()
        first.zero_grad(), second.zero_grad()
    checks = [("0.weight", first, ("momentum_buffer",)), ("2.weight", second, ("exp_avg", "exp_avg_sq"))]
    params = dict(model.named_parameters())
    for name, optimizer, keys in checks:
        m = masks[name]
        assert torch.count_nonzero(params[name][~m]) == 0
        for key in keys:
            assert torch.count_nonzero(optimizer.state[params[name]][key][~m]) == 0, (name, key)
            assert torch.count_nonzero(optimizer.state[params[name]][key][m]) > 0, (name, key)
    core.detach()
    with torch.no_grad():
        params["0.weight"].fill_(1.0)
    first.step()  # no hooks left: nothing is zeroed any more
    assert bool((params["0.weight"] == 1.0).all())


def test_a_resumed_run_reads_the_masks_of_the_first_run_or_refuses(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    path = tmp_path / "m.wtm"
    with pytest.raises(ValueError, match="resumes from a checkpoint, but this callback has no masks"):
        PruneAtStart(DENSITY, "magnitude", save_path=path).resumed("test")
    first = PruneAtStart(DENSITY, "magnitude", save_path=path, verbose=False)
    first.prune(model, [torch.zeros(2, 6)])
    first.save()
    again = PruneAtStart(DENSITY, "magnitude", save_path=path)
    again.resumed("test")
    assert sorted(again.masks) == sorted(first.masks)
    assert all(torch.equal(again.masks[n], first.masks[n]) for n in first.masks)


# ---------------------------------------------------------------------------------------------
# Hugging Face

def _bert():
    transformers = pytest.importorskip("transformers", reason='needs transformers: pip install "widetopo[hf]"')
    pytest.importorskip("accelerate", reason='the HF Trainer needs accelerate: pip install "widetopo[hf]"')
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers, transformers.BertForSequenceClassification(config)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(100 + i)
        return {"input_ids": torch.randint(0, 40, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": torch.tensor(i % 3)}


def _hf_train(transformers, model, callback, out):
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-3, weight_decay=0.01, report_to=[], save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=7)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])
    trainer.train()
    return trainer


def test_hf_trainer_prunes_at_train_begin_and_keeps_pruned_weights_and_adam_moments_zero(tmp_path):
    transformers, model = _bert()
    from widetopo.integrations.hf import WidetopoPruning

    init = copy.deepcopy(model)
    callback = WidetopoPruning(DENSITY, "snip", batches=2, verbose=False)
    assert isinstance(callback, transformers.TrainerCallback)
    trainer = _hf_train(transformers, model, callback, tmp_path / "a")
    assert trainer.state.global_step == 2

    masks = callback.masks
    numel = sum(m.numel() for m in masks.values())
    assert len(masks) > 0 and sum(int(m.sum()) for m in masks.values()) == round(DENSITY * numel)
    params = dict(model.named_parameters())
    start = dict(init.named_parameters())
    optimizer = trainer.optimizer.optimizer  # the torch AdamW under accelerate's wrapper
    assert isinstance(optimizer, torch.optim.AdamW)
    for n, m in masks.items():
        assert torch.count_nonzero(params[n][~m]) == 0, n
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(optimizer.state[params[n]][key][~m]) == 0, (n, key)
        # AdamW's decoupled weight decay moves every kept weight
        assert bool((params[n][m] != start[n][m]).all()), n

    # the same training with the masks applied by a callback written here
    class ZeroPruned(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in masks:
                        p[~masks[n]] = 0

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in masks:
                        p[~masks[n]] = 0
                        for key in ("exp_avg", "exp_avg_sq"):
                            optimizer.state[p][key][~masks[n]] = 0

    reference = _hf_train(transformers, init, ZeroPruned(), tmp_path / "b")
    for n, p in reference.model.named_parameters():
        torch.testing.assert_close(params[n], p, rtol=0, atol=0, msg=n)
    assert callback.enforcers == []  # the hooks are removed at on_train_end


# ---------------------------------------------------------------------------------------------
# lazy imports, install hints, extras

def test_importing_the_modules_imports_neither_framework():
    code = ("import sys, widetopo.integrations.lightning, widetopo.integrations.hf\n"
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module, blocked, hint", [
    ("lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"), 'pip install "widetopo[lightning]"'),
    ("hf", ("transformers",), 'pip install "widetopo[hf]"'),
])
def test_a_missing_framework_names_the_extra_to_install(module, blocked, hint):
    code = ("import sys\n"
            f"for name in {blocked!r}:\n"
            "    sys.modules[name] = None\n"
            f"import widetopo.integrations.{module} as m\n"
            "try:\n"
            "    m.WidetopoPruning\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert hint in out.stdout


def test_pyproject_extras_for_the_integrations():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extras["lightning"] == ["lightning"]
    assert any(req.startswith("transformers") for req in extras["hf"])
    assert any(req.startswith("accelerate") for req in extras["hf"])
    assert "lightning" in extras["test"] and any(req.startswith("accelerate") for req in extras["test"])
