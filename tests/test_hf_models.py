"""Hugging Face models fed as their users feed them (issue #15 item 1, docs/design.md §2.5).

Tiny models built from configs (never from_pretrained): ViT, BERT, GPT-2 and a ResNet, pruned by
every registered method from dict batches (input_ids + attention_mask with padding, or
pixel_values; labels inside the batch). References are written here by hand (plain autograd on
the model's own loss, a hand-shifted LM cross entropy, the network after the embedding fed the
embedding output).
"""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")  # an optional test dependency (pyproject: test extra)

import widetopo  # noqa: E402
from widetopo.engine.batches import data_digest, materialize_batches  # noqa: E402
from widetopo.methods import get_method, method_names  # noqa: E402
from widetopo.sparsity.selection import select_prunable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DENSITY = 0.2
SHORT = {"rounds": 2, "restorations": 0}
SHORT_WIDETOPO = {"rounds": 2, "restorations": 1, "restore_steps": 2, "restore_rounds": 1}
#: GraSP divides the logits by T = 200, which a model's own loss cannot: refused by default
#: (test_grasp_default_temperature_is_refused), run with the model's loss at T = 1
METHOD_OPTIONS = {"grasp": {"temperature": 1.0}, "rreg": {"rounds": 1},  # (rreg is one-shot)
                  "pags": {"population": 4, "min_kept": 10}}  # (a small population: seconds, not minutes)
#: documented refusals, not of the inputs: raised before any work, the model unchanged
REFUSED = {
    ("gpt2", "phew"): (ValueError, "tied weights"),  # GPT-2's LM head is its token embedding
    ("gpt2", "npb"): (ValueError, "Conv/ConvTranspose/Linear"),  # path counts per Conv/Linear input channel
}
VOCAB, LENGTH, N = 30, 6, 4

transformers.logging.set_verbosity_error()


def _ids(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (N, LENGTH), generator=g)
    mask = torch.ones(N, LENGTH, dtype=torch.long)
    mask[0, 4:] = 0  # a padded sample: attention_mask must reach the model
    mask[2, 5:] = 0
    return ids, mask


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg)
    batches = []
    for seed in (1, 2):
        ids, mask = _ids(seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])})
    return model, batches


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    batches = []
    for seed in (1, 2):
        ids, mask = _ids(seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return model, batches


def vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(1)
    return model, [{"pixel_values": torch.randn(N, 3, 8, 8, generator=g), "labels": torch.tensor([0, 1, 2, 0])}]


def resnet():
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=3)
    model = transformers.ResNetForImageClassification(cfg)
    g = torch.Generator().manual_seed(1)
    return model, [{"pixel_values": torch.randn(N, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1, 2, 0])}]


MODELS = {"vit": vit, "bert": bert, "gpt2": gpt2, "resnet": resnet}
METHODS = method_names()


def _options(method):
    base = SHORT_WIDETOPO if method.startswith("widetopo") else SHORT
    return {**base, **METHOD_OPTIONS.get(method, {})}


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            [(n, m.training) for n, m in model.named_modules()])


def _assert_unchanged(model, snap):
    state, modes = snap
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state)
    for k, v in state.items():
        assert torch.equal(after[k].detach(), v), f"{k} changed"
    assert [(n, m.training) for n, m in model.named_modules()] == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch,method", [(a, m) for a in MODELS for m in METHODS])
def test_every_method_on_hf_models(arch, method):
    """Exact K (a method's kept_bounds for rreg), the caller's model untouched, then 3 AdamW steps under MaskEnforcer keep every
    pruned weight at zero while the kept ones train."""
    model, batches = MODELS[arch]()
    names = select_prunable(model)
    params = dict(model.named_parameters())
    n_p = sum(params[n].numel() for n in names)
    snap = _snapshot(model)
    if (arch, method) in REFUSED:
        error, match = REFUSED[(arch, method)]
        with pytest.raises(error, match=match):
            widetopo.prune(model, batches, DENSITY, method=method, seed=0, verbose=False, **_options(method))
        _assert_unchanged(model, snap)
        return
    masks = widetopo.prune(model, batches, DENSITY, method=method, seed=0, verbose=False, **_options(method))
    _assert_unchanged(model, snap)
    assert list(masks) == names
    keep = int(DENSITY * n_p + 0.5)
    bounds = getattr(get_method(method).make_scorer(), "kept_bounds", None)  # whole kernels / graphs (rreg)
    lo, hi = (keep, keep) if bounds is None else bounds([tuple(params[n].shape) for n in names], keep)
    assert lo <= sum(int(m.sum()) for m in masks.values()) <= hi

    net = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    trained = dict(net.named_parameters())
    start = {n: trained[n].detach().clone() for n in names}
    with widetopo.MaskEnforcer(net, masks, opt):
        for step in range(3):
            opt.zero_grad()
            net(**batches[step % len(batches)]).loss.backward()
            opt.step()
    for n in names:
        w = trained[n].detach()
        assert not w[~masks[n]].any(), f"{n}: a pruned weight came back"
    moved = sum(int((trained[n].detach() != start[n])[masks[n]].sum()) for n in names)
    assert moved > 0


@pytest.mark.parametrize("arch", list(MODELS))
def test_apply_masks_then_compiled_forward_backward(arch):
    """apply_masks on the bare model, then torch.compile (backend "aot_eager": AOTAutograd
    tracing without inductor's C++ build, which is too slow on this CPU) forward + backward:
    the compiled loss equals the eager one and pruned weights get no gradient through the mask."""
    model, batches = MODELS[arch]()
    masks = widetopo.prune(model, batches, DENSITY, method="widetopo-s", verbose=False, **SHORT_WIDETOPO)
    net = copy.deepcopy(model).eval()
    widetopo.apply_masks(net, masks)
    for name, m in masks.items():
        assert not net.get_submodule(name.rsplit(".", 1)[0]).weight[~m].any()
    eager = net(**batches[0]).loss
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=False)
    loss = compiled(**batches[0]).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for name, m in masks.items():
        module = net.get_submodule(name.rsplit(".", 1)[0])
        assert not module.weight_orig.grad[~m].any()
        assert module.weight_orig.grad[m].abs().sum() > 0 or not m.any()


# ------------------------------------------------------------------ references written by hand

def _snip_by_hand(model, batches, loss_of):
    """|sum_b dL_b/dtheta * theta| over the default prunable weights, eval mode, plain autograd."""
    net = copy.deepcopy(model).double().eval()
    names = select_prunable(net)
    params = dict(net.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for b in batches:
        grads = torch.autograd.grad(loss_of(net, b), [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g
    return {n: (total[n] * params[n]).abs().detach() for n in names}


def _close(got, ref):
    assert list(got) == list(ref)
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-9 * float(ref[n].abs().max()) + 1e-12)


def test_snip_differentiates_the_models_own_loss_with_the_attention_mask():
    model, batches = bert()
    got = widetopo.saliency(model.double(), batches, "snip", verbose=False)
    _close(got, _snip_by_hand(model, batches, lambda net, b: net(**b).loss))
    # the attention mask matters: without it the scores differ
    unmasked = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    other = widetopo.saliency(model, unmasked, "snip", verbose=False)
    assert any(not torch.allclose(got[n], other[n]) for n in got)


def test_language_model_loss_is_shifted():
    """GPT-2's own loss: token t predicts token t+1, padded positions (-100) ignored; written out."""
    model, batches = gpt2()

    def shifted(net, b):
        logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = b["labels"][:, 1:]
        keep = target != -100
        picked = logp.gather(-1, torch.where(keep, target, 0)[..., None])[..., 0]
        return -(picked * keep).sum() / keep.sum()

    got = widetopo.saliency(model.double(), batches, "snip", verbose=False)
    _close(got, _snip_by_hand(model, batches, shifted))


def test_targets_key_uses_cross_entropy_of_the_logits_and_loss_fn_overrides():
    model, batches = bert()
    model.double()
    as_targets = [{**{k: v for k, v in b.items() if k != "labels"}, "targets": b["labels"]} for b in batches]

    def ce(net, b):
        logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return -torch.log_softmax(logits, -1).gather(1, b["targets"][:, None]).mean()

    _close(widetopo.saliency(model, as_targets, "snip", verbose=False), _snip_by_hand(model, as_targets, ce))

    def squared(output, target):  # a custom loss of the output
        return (output.logits[:, 0] - target.double()).pow(2).mean()

    def sq_ref(net, b):
        return squared(net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b["labels"])

    _close(widetopo.saliency(model, batches, "snip", loss_fn=squared, verbose=False),
           _snip_by_hand(model, batches, sq_ref))


class _Custom(nn.Module):
    """A custom head: forward(tokens, scale=1) returns a dict without 'logits'."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens, scale=1.0):
        return {"scores": self.fc(self.emb(tokens).mean(1)) * scale}


def test_forward_fn_and_loss_fn_hooks_reach_every_method_and_refusals():
    torch.manual_seed(0)
    model = _Custom().double()
    ids, _ = _ids(1)
    data = [(ids, torch.tensor([0, 1, 2, 1]))]

    def forward_fn(net, x):
        return net(x, 2.0)["scores"]

    with pytest.raises(widetopo.UnsupportedInputsError, match="forward_fn"):
        widetopo.prune(model, data, 0.5, method="magnitude", verbose=False)  # the probe: no logits, no forward
    ref = _snip_by_hand(model, [data[0]], lambda net, b: nn.functional.cross_entropy(forward_fn(net, b[0]), b[1]))
    _close(widetopo.saliency(model, data, "snip", forward_fn=forward_fn, verbose=False), ref)
    for method in ("widetopo-s", "synflow", "ntk-sap", "grasp"):
        masks = widetopo.prune(model, data, 0.5, method=method, forward_fn=forward_fn, verbose=False, **SHORT)
        assert sum(int(m.sum()) for m in masks.values()) == 12
        assert masks.meta["forward_fn"].endswith("forward_fn")
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        widetopo.prune(model, data, 0.5, method="snip", loss_fn="mse", forward_fn=forward_fn, verbose=False)


def test_grasp_default_temperature_is_refused_before_any_work():
    model, batches = bert()
    snap = _snapshot(model)
    with pytest.raises(widetopo.UnsupportedInputsError, match="temperature=1"):
        widetopo.prune(model, batches, DENSITY, method="grasp", verbose=False)
    _assert_unchanged(model, snap)


class _AfterEmbedding(nn.Module):
    """BERT's encoder + head fed a floating tensor as inputs_embeds (same parameters)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, embeds):
        return self.model(inputs_embeds=embeds).logits


@pytest.mark.parametrize("method", ["widetopo", "synflow", "ntk-sap", "px"])
def test_token_methods_act_on_the_embedding_output(method):
    """§2.5: on token ids the input-perturbing methods act on the embedding output; the scores
    equal those of the same network fed that output as a floating input (inputs_embeds)."""
    model, batches = bert()
    model.double()
    batch = {**batches[0], "attention_mask": torch.ones(N, LENGTH, dtype=torch.long)}  # no padding: the
    wrapped = _AfterEmbedding(model)  # reference feeds one fixed mask to batches of 1, 2 and N samples
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    # WideTopo's NTK term differentiates every parameter, the word embeddings included, which the
    # reference does not have: compare its input-perturbing ITA term (mu1 = 0)
    opts = {"mu1": 0.0} if method == "widetopo" else {}
    got = widetopo.saliency(model, [batch], method, verbose=False, **opts)
    ref = widetopo.saliency(wrapped, [(embeds, batch["labels"])], method, verbose=False, **opts)
    assert [f"model.{n}" for n in got] == list(ref)
    for n in got:
        torch.testing.assert_close(got[n], ref[f"model.{n}"], rtol=1e-6, atol=1e-12)
    assert sum(float(s.abs().sum()) for s in got.values()) > 0


def test_dict_batches_are_read_like_tuples_and_digested_whole():
    _, batches = bert()
    read = materialize_batches(batches, torch.device("cpu"), max_samples=6)
    assert [b.n for b in read] == [4, 2]
    assert sorted(read[1].x) == ["attention_mask", "input_ids"] and read[1].label_key == "labels"
    assert torch.equal(read[1].x["attention_mask"], batches[1]["attention_mask"][:2])
    assert torch.equal(read[1].y, batches[1]["labels"][:2])
    other = copy.deepcopy(batches)
    other[1]["attention_mask"][1, 0] = 0  # only the mask differs
    a = data_digest(materialize_batches(batches, torch.device("cpu")))
    assert a == data_digest(materialize_batches(copy.deepcopy(batches), torch.device("cpu")))
    assert a != data_digest(materialize_batches(other, torch.device("cpu")))
    pair = materialize_batches([({"input_ids": batches[0]["input_ids"]}, batches[0]["labels"])], torch.device("cpu"))
    assert torch.equal(pair[0].y, batches[0]["labels"]) and pair[0].label_key is None and list(pair[0].x) == ["input_ids"]
    with pytest.raises(ValueError, match="every batch must hold samples of one shape"):
        materialize_batches([batches[0], {"input_ids": batches[1]["input_ids"][:, :3]}], torch.device("cpu"))


def test_a_0_dim_tensor_first_in_a_dict_batch_is_passed_through():
    """The sample count of a dict batch is the leading size of its first tensor that has one: a
    0-dim value listed first (a wrapper's `temperature`) is passed through, and max_samples cuts
    the other tensors. Reference: SNIP by hand on the first 6 samples, logits / temperature."""
    model, batches = bert()
    model = model.double()

    class Tempered(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, temperature, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits / temperature

    net = Tempered(model)
    hot = [{"temperature": torch.tensor(2.0, dtype=torch.float64), **b} for b in batches]
    read = materialize_batches(hot, torch.device("cpu"), max_samples=6)
    assert [b.n for b in read] == [4, 2] and float(read[1].x["temperature"]) == 2.0
    got = widetopo.saliency(net, hot, "snip", max_samples=6, verbose=False)
    cut = [batches[0], {k: v[:2] for k, v in batches[1].items()}]

    def loss(m, b):
        logits = m.inner(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits / 2.0
        return nn.functional.cross_entropy(logits, b["labels"])  # the mean over the batch

    _close(got, _snip_by_hand(net, cut, loss))


@pytest.mark.parametrize("method", ["synflow", "ntk-sap", "px", "widetopo-s"])
def test_a_0_dim_tensor_is_never_the_perturbed_input(method):
    """Methods that replace or perturb the input (all-ones samples, noise, the ITA step) act on
    the first floating tensor with a sample dimension: a 0-dim `scale` listed before `x` is
    passed through like the number 2.0 it holds, so the saliencies are those of scale=2.0."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, scale, x):
            return self.b(torch.relu(self.a(x))) * scale

    torch.manual_seed(0)
    net = Scaled().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    as_tensor = widetopo.saliency(net, [{"scale": torch.tensor(2.0, dtype=torch.float64), "x": x, "labels": y}],
                                  method, verbose=False)
    as_number = widetopo.saliency(net, [{"scale": 2.0, "x": x, "labels": y}], method, verbose=False)
    for n in as_number:
        torch.testing.assert_close(as_tensor[n], as_number[n], rtol=1e-12, atol=0)


def test_effective_sparsity_of_a_token_model_by_hand():
    """Embedding -> Linear(4, 3) -> ReLU -> Linear(3, 2), masks set by hand: unit 1 of the first
    layer feeds nothing (column 1 of the second layer pruned), feature 0 of the embedding output
    reaches nothing (column 0 of the first layer pruned)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    m1 = torch.ones(3, 4, dtype=torch.bool)
    m1[:, 0] = False
    m2 = torch.ones(2, 3, dtype=torch.bool)
    m2[:, 1] = False
    table = torch.rand(VOCAB, 4) < 0.5
    masks = {"0.weight": table, "1.weight": m1, "3.weight": m2}
    ids, mask = _ids(1)
    out = widetopo.effective_sparsity(net, masks, inputs=ids)
    layers = out["layers"]
    assert layers["3.weight"]["effective"] == 4
    assert layers["1.weight"]["effective"] == 9 - 3  # row 1 feeds nothing
    assert layers["0.weight"]["effective"] == int(table[:, 1:].sum())  # feature 0 reaches nothing
    assert layers["1.weight"]["effective_nodes"] == 2
    stats = widetopo.Masks(masks).stats(net, inputs={"input": ids, "labels": ids[:, 0]},
                                        forward_fn=lambda model, x: model(x["input"]))
    assert [s.effective for s in stats] == [int(table[:, 1:].sum()), 6, 4]


class _NoLabels(nn.Module):
    """forward(input_ids, attention_mask) without a labels keyword: the loss is widetopo's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return (self.fc(h.sum(1) / attention_mask.sum(1, keepdim=True)),)


def test_labels_of_a_model_without_a_labels_keyword_go_to_the_cross_entropy():
    torch.manual_seed(0)
    model = _NoLabels().double()
    ids, mask = _ids(1)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}

    def ce(net, b):
        return nn.functional.cross_entropy(net(b["input_ids"], b["attention_mask"])[0], b["labels"])

    _close(widetopo.saliency(model, [batch], "snip", verbose=False), _snip_by_hand(model, [batch], ce))


def test_grasp_temperature_reaches_a_loss_fn():
    """With loss_fn, GraSP hands it the output with logits / T: equal to cross entropy of
    logits / T written out (the batch's targets under 'targets')."""
    model, batches = bert()
    model.double()
    as_targets = [{**{k: v for k, v in b.items() if k != "labels"}, "targets": b["labels"]} for b in batches]

    def ce(output, target):
        return -torch.log_softmax(output.logits, -1).gather(1, target[:, None]).mean()

    got = widetopo.saliency(model, batches, "grasp", loss_fn=ce, verbose=False)
    ref = widetopo.saliency(model, as_targets, "grasp", verbose=False)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-14)
    assert any(float(s.abs().sum()) > 0 for s in got.values())


def test_checkpoint_fingerprints_every_entry_of_dict_batches(tmp_path):
    model, batches = bert()
    path = tmp_path / "run.ckpt"
    opts = dict(method="snip", rounds=2, verbose=False, checkpoint=path)
    first = widetopo.prune(model, batches, DENSITY, **opts)
    again = widetopo.prune(model, batches, DENSITY, **opts)  # resumes the finished run
    assert all(torch.equal(first[n], again[n]) for n in first)
    other = copy.deepcopy(batches)
    other[0]["attention_mask"][1, -1] = 0
    with pytest.raises(widetopo.CheckpointMismatch):
        widetopo.prune(model, other, DENSITY, **opts)
