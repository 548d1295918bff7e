"""widetopo.ntk_spectrum / ntk_matrix on dict inputs fed as model(**inputs) (Hugging Face style).

References written here: J built row by row, one torch.autograd.grad per output entry of a
float64 copy of the model whose masked parameters hold θ ⊙ m (the model's own attention kernel,
reverse mode only), times the mask; Θ = J Jᵀ and its eigvalsh. Tiny BERT / GPT-2 / ViT / ResNet
built from configs, and a plain keyword model compared with its positional (tensor) call and with
the closed form of a scaled output (Θ scales by the square).
"""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")  # an optional test dependency (pyproject: test extra)

import widetopo  # noqa: E402
from widetopo.sparsity.spectrum import spectrum_report  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()

VOCAB, LENGTH, N = 20, 5, 3


def _ids(seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (N, LENGTH), generator=g)
    mask = torch.ones(N, LENGTH, dtype=torch.long)
    mask[0, 3:] = 0  # a padded sample: the attention mask must reach the model
    return {"input_ids": ids, "attention_mask": mask}


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), _ids(1)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), _ids(2)  # logits (n, L, vocab); head tied to wte


def vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    g = torch.Generator().manual_seed(3)
    return transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(N, 3, 8, 8, generator=g)}


def resnet():
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1],
                                    layer_type="basic", num_labels=3)
    g = torch.Generator().manual_seed(4)
    return transformers.ResNetForImageClassification(cfg), {"pixel_values": torch.randn(N, 3, 8, 8, generator=g)}


def random_masks(model, seed, density=0.5):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) < density for n in widetopo.select_prunable(model)}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else out["logits"]


def reference_jacobian(model, call, masks, names, bn_train=False):
    """J (rows sample-major, one per output entry) of the logits of call(net) on a float64 copy
    whose masked parameters hold θ ⊙ m: each row torch.autograd.grad of one entry w.r.t. the
    `names` parameters, times the mask (∂f(θ⊙m)/∂θ = m ⊙ ∂f/∂u at u = θ⊙m)."""
    net = copy.deepcopy(model).double().eval()
    if bn_train:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.double())
    out = _logits(call(net)).reshape(-1)
    rows = []
    for e in out:
        grads = torch.autograd.grad(e, [params[n] for n in names], retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g * masks[n].double() if n in masks
                                else g).reshape(-1) for n, g in zip(names, grads)]))
    return torch.stack(rows)


def _double(x):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in x.items()}


def _close(actual, expected, scale):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11 * scale)


# ----------------------------------------------------------------------------- Hugging Face models

@pytest.mark.parametrize("build", [bert, gpt2, vit])
def test_hf_model_spectrum_equals_reference_jacobian(build):
    """full = eigvalsh(J Jᵀ), ntk_matrix = J Jᵀ, exact trace = Σ J², topk = the top of eigvalsh,
    with per-sample chunks (chunk_size=2 of 3 samples) and one-sample blocks of rows."""
    model, x = build()
    masks = random_masks(model, seed=5)
    names = widetopo.select_prunable(model)
    J = reference_jacobian(model, lambda net: net(**_double(x)), masks, names)
    theta = J @ J.T
    expected = torch.linalg.eigvalsh(theta).flip(0)
    scale = float(expected[0])
    _close(widetopo.ntk_matrix(model, x, masks, chunk_size=2, max_block_bytes=1), theta, scale)
    _close(widetopo.ntk_spectrum(model, x, masks), expected, scale)
    _close(widetopo.ntk_spectrum(model, x, masks, mode="trace", chunk_size=2), J.square().sum(), scale)
    k = 4
    top = widetopo.ntk_spectrum(model, x, masks, mode="topk", k=k, chunk_size=2, tol=1e-10)
    torch.testing.assert_close(top, expected[:k], rtol=1e-7, atol=1e-9 * scale)


def test_batchnorm_train_couples_dict_samples():
    """An HF ResNet fed pixel_values with batchnorm="train": the statistics of all samples (the
    reference differentiates the whole batch with BatchNorm in train mode); outputs="sum" is the
    kernel of the summed logits."""
    model, x = resnet()
    masks = random_masks(model, seed=6)
    names = widetopo.select_prunable(model)
    J = reference_jacobian(model, lambda net: net(**_double(x)), masks, names, bn_train=True)
    expected = torch.linalg.eigvalsh(J @ J.T).flip(0)
    scale = float(expected[0])
    _close(widetopo.ntk_spectrum(model, x, masks, batchnorm="train", chunk_size=1), expected, scale)
    Js = J.reshape(N, 3, -1).sum(1)  # the rows of the summed output
    _close(widetopo.ntk_spectrum(model, x, masks, batchnorm="train", outputs="sum"),
           torch.linalg.eigvalsh(Js @ Js.T).flip(0), scale)
    top = widetopo.ntk_spectrum(model, x, masks, batchnorm="train", mode="topk", k=3, chunk_size=1, tol=1e-10)
    torch.testing.assert_close(top, expected[:3], rtol=1e-7, atol=1e-9 * scale)


def test_targets_are_taken_out_and_the_callers_dict_kept():
    """A batch holding labels (as widetopo.prune takes them) gives the spectrum of the inputs
    without them; the caller's dict is not changed."""
    model, x = bert()
    masks = random_masks(model, seed=7)
    labels = torch.tensor([0, 2, 1])
    batch = {**x, "labels": labels}
    keys = list(batch)
    got = widetopo.ntk_spectrum(model, batch, masks)
    names = widetopo.select_prunable(model)
    J = reference_jacobian(model, lambda net: net(**x), masks, names)
    _close(got, torch.linalg.eigvalsh(J @ J.T).flip(0), float(got[0]))
    assert list(batch) == keys and batch["labels"] is labels


# ----------------------------------------------------------------------------- a keyword model

class KeywordNet(nn.Module):
    """forward(x=None, scale=1.0, shift=None): logits l2(relu(bn(l1 x))) · scale (+ shift), returned
    as a tensor, a dict with "logits" or a tuple (logits, hidden)."""

    def __init__(self, returns="tensor"):
        super().__init__()
        torch.manual_seed(8)
        self.l1, self.bn, self.l2 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
        self.returns = returns

    def forward(self, x=None, scale=1.0, shift=None):
        h = torch.relu(self.bn(self.l1(x)))
        out = self.l2(h) * scale
        if shift is not None:
            out = out + shift
        return {"dict": lambda: {"logits": out}, "tuple": lambda: (out, h)}.get(self.returns, lambda: out)()


KW_NAMES = ["l1.weight", "l2.weight"]


def _kw_masks(net):
    g = torch.Generator().manual_seed(9)
    return {n: torch.rand(dict(net.named_parameters())[n].shape, generator=g) < 0.6 for n in KW_NAMES}


@pytest.mark.parametrize("returns", ["tensor", "dict", "tuple"])
@pytest.mark.parametrize("batchnorm", ["eval", "train"])
def test_keyword_model_matches_reference_and_tensor_call(returns, batchnorm):
    net = KeywordNet(returns)
    masks = _kw_masks(net)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(10))
    J = reference_jacobian(net, lambda n: n(x=x.double()), masks, KW_NAMES, bn_train=batchnorm == "train")
    expected = torch.linalg.eigvalsh(J @ J.T).flip(0)
    scale = float(expected[0])
    kw = dict(batchnorm=batchnorm, chunk_size=1)
    got = widetopo.ntk_spectrum(net, {"x": x}, masks, **kw)
    _close(got, expected, scale)
    _close(widetopo.ntk_spectrum(net, x, masks, **kw), got, scale)  # the positional call
    for extra in (dict(mode="trace"), dict(mode="trace", probes=5), dict(mode="topk", k=3, tol=1e-10),
                  dict(outputs="sum")):
        _close(widetopo.ntk_spectrum(net, {"x": x}, masks, **kw, **extra),
               widetopo.ntk_spectrum(net, x, masks, **kw, **extra), scale)


def test_non_batched_values_are_passed_to_every_call():
    """scale (a float) and shift (a 0-dim tensor) reach every per-sample call: f = c·g + s has
    J_f = c·J_g, so Θ_f = c² Θ_g (shift changes nothing)."""
    net = KeywordNet()
    masks = _kw_masks(net)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(11))
    plain = widetopo.ntk_spectrum(net, x, masks, chunk_size=1)
    scaled = widetopo.ntk_spectrum(net, {"x": x, "scale": 3.0, "shift": torch.tensor(0.5)}, masks, chunk_size=1)
    _close(scaled, 9.0 * plain, float(scaled[0]))
    assert float(plain[0]) > 0


def test_spectrum_report_counts_dict_samples(tmp_path):
    pytest.importorskip("matplotlib")
    net = KeywordNet()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(12))
    result = spectrum_report(net, {"x": x, "labels": torch.zeros(4)}, {"dense": None, "m": _kw_masks(net)},
                             tmp_path / "s.png")
    assert result["samples"] == 4 and len(result["spectra"]["m"]["eigenvalues"]) == 12
    _close(torch.tensor(result["spectra"]["m"]["eigenvalues"], dtype=torch.float64),
           widetopo.ntk_spectrum(net, x, _kw_masks(net)), result["spectra"]["m"]["eigenvalues"][0])


# ----------------------------------------------------------------------------- bad inputs

X4 = torch.randn(3, 4)


@pytest.mark.parametrize("inputs, match", [
    ({}, "no tensor"),
    ({"scale": 2.0, "flag": True}, "no tensor"),
    ({"x": torch.tensor(1.0)}, "no tensor"),                        # 0-dim only: no sample dimension
    ({"labels": torch.zeros(3)}, "no tensor"),                      # only targets
    ({"x": X4, "other": torch.ones(2, 4)}, "leading size"),
    ({"x": X4, "labels": torch.zeros(3), "y": torch.zeros(3)}, "several keys"),
    ({"x": torch.zeros(0, 4)}, "at least one sample"),
    ({1: X4}, "strings"),
    ({"x": X4.to(torch.complex64)}, "complex"),
    ((X4,), "dict of keyword inputs"),
])
def test_bad_dict_inputs_name_inputs_and_change_nothing(inputs, match):
    net = KeywordNet().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for call in (lambda: widetopo.ntk_spectrum(net, inputs), lambda: widetopo.ntk_matrix(net, inputs)):
        with pytest.raises((ValueError, TypeError), match="inputs") as info:
            call()
        assert match in str(info.value)
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_model_output_without_logits_is_refused():
    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 2)

        def forward(self, x=None):
            return {"hidden": self.l(x)}

    with pytest.raises(TypeError, match="logits"):
        widetopo.ntk_spectrum(NoLogits(), {"x": X4})
