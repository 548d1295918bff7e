"""The method registry: one declaration per method feeds prune(), saliency(), the CLI, the mask
metadata and the docs; engine hooks prepass (whole-set sums) and per-layer quotas."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

import widetopo
import widetopo.cli as cli
from widetopo.methods import Method, Schedule, all_methods, get_method, method_names, methods_markdown
from widetopo.options import Options, option, parse_assignment, positive
from widetopo.scores.base import Scorer

pytestmark = [pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def data(n=2, bs=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 3, generator=g), torch.randint(0, 2, (bs,), generator=g)) for _ in range(n)]


def test_every_method_resolves_with_its_aliases_and_defaults():
    names = method_names()
    assert len(names) == len(set(names))
    for m in all_methods():
        assert get_method(m.name) is m and get_method(m.name.upper()) is m
        for alias in m.aliases:
            assert get_method(alias) is m
        assert issubclass(m.scorer, Scorer) and issubclass(m.options, Options)
        m.options()  # the defaults validate
        scorer = m.make_scorer()
        assert scorer.name == m.name and isinstance(scorer.options, m.options)
    assert get_method("widetopo_s").name == "widetopo-s"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_method_options_are_validated_with_the_option_name():
    wt = get_method("widetopo")
    assert wt.make_scorer(eps=1e-3).options.eps == 1e-3
    with pytest.raises(ValueError, match=r"eps must be in \[1e-07, 1\]"):
        wt.make_scorer(eps=-1.0)
    with pytest.raises(ValueError, match="unknown option.*'mu3'.*its options are: mu1, mu2, eps, probes, ita_batched"):
        wt.make_scorer(mu3=1.0)


def test_parse_assignment_types_the_value_from_the_dataclass():
    opts = get_method("widetopo").options
    assert parse_assignment([opts], "eps=0.01") == ("eps", 0.01)
    assert parse_assignment([opts], "probes=3") == ("probes", 3)
    assert parse_assignment([get_method("snip").options], "calibrate-bn=true") == ("calibrate_bn", True)
    assert parse_assignment([get_method("synflow").options], "input_shape=3x8x8") == ("input_shape", (3, 8, 8))
    assert parse_assignment([get_method("synflow").options], "input_shape=none") == ("input_shape", None)
    with pytest.raises(ValueError, match="probes: cannot read 'x'"):
        parse_assignment([opts], "probes=x")
    with pytest.raises(ValueError, match="unknown option 'nope'; allowed: eps, ita_batched, mu1, mu2, probes"):
        parse_assignment([opts], "nope=1")
    with pytest.raises(ValueError, match="expected key=value"):
        parse_assignment([opts], "eps")


def test_methods_markdown_lists_every_method_and_option():
    text = methods_markdown()
    for m in all_methods():
        assert f"| `{m.name}` |" in text
        for f in dataclasses.fields(m.options):
            assert f"`{f.name}`" in text


def test_mask_metadata_records_method_and_options():
    masks = widetopo.prune(tiny_mlp(), data(), 0.5, method="snip", batchnorm="eval", calibrate_bn=True,
                           verbose=False)
    assert masks.meta["method"] == "snip" and masks.meta["calibrate_bn"] is True
    assert masks.meta["batchnorm"] == "eval"
    assert masks.meta["ignore_index"] == -100 and masks.meta["rounds"] == 1


# ---------------------------------------------------------------------------------- saliency

def test_saliency_of_snip_equals_a_hand_computation():
    model = tiny_mlp()
    batches = data()
    got = widetopo.saliency(model, batches, "snip")
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters() if n.endswith("weight")}
    m64 = tiny_mlp().double()
    for x, y in batches:
        m64.zero_grad()
        nn.functional.cross_entropy(m64(x.double()), y).backward()
        for n, p in m64.named_parameters():
            if n in ref:
                ref[n] += p.grad * p.detach()
    assert list(got) == list(ref)
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n].abs(), rtol=1e-5, atol=1e-7)


def test_saliency_respects_given_masks_and_leaves_model_alone():
    model = tiny_mlp()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    masks = {"0.weight": torch.rand(4, 3, generator=torch.Generator().manual_seed(3)) > 0.5,
             "2.weight": torch.ones(2, 4, dtype=torch.bool)}
    got = widetopo.saliency(model, data(), "magnitude", masks=masks)
    w = model[0].weight.detach()
    torch.testing.assert_close(got["0.weight"], (w * masks["0.weight"]).abs())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(ValueError, match="masks must cover exactly the prunable parameters"):
        widetopo.saliency(model, data(), "magnitude", masks={"0.weight": masks["0.weight"]})


# ---------------------------------------------------------------------------------- hooks

class PrepassScorer(Scorer):
    """score = (sum over the whole set of x.mean()) * |theta|: needs the total before scoring."""

    name = "prepass-test"
    data_dependent = True

    def prepass(self, ctx, batches):
        total = torch.zeros(())
        for b in batches:
            total += b.x.mean()
        return [total]

    def score(self, ctx, batches):
        (total,) = ctx.prepass
        self.seen = float(total)
        return [p.abs() * float(total) * len(batches) for p in ctx.prunable]


def test_prepass_total_reaches_score():
    batches = data(3)
    scorer = PrepassScorer()
    widetopo.saliency(tiny_mlp(), batches, scorer)
    assert scorer.seen == pytest.approx(sum(float(x.mean()) for x, _ in batches), rel=1e-6)


@dataclasses.dataclass(frozen=True)
class HalfOptions(Options):
    scale: float = option(1.0, "a positive scale", positive)


class HalfPerLayer(Scorer):
    """Keeps the largest |theta| inside each layer, K split as evenly as possible."""

    name = "half-per-layer"
    data_dependent = False
    selection = "layerwise"
    Options = HalfOptions

    def score(self, ctx, batches):
        return [p.abs() * self.options.scale for p in ctx.prunable]

    def layer_quotas(self, ctx, keep):
        n = len(ctx.names)
        return [keep // n + (1 if i < keep % n else 0) for i in range(n)]


def test_layerwise_selection_keeps_the_quota_of_each_layer():
    model = tiny_mlp()
    masks = widetopo.prune(model, data(), 0.5, method=HalfPerLayer(), verbose=False)  # K = 10 of 20
    assert [int(m.sum()) for m in masks.values()] == [5, 5]
    for name, module in (("0.weight", model[0]), ("2.weight", model[2])):
        w = module.weight.detach().abs().flatten()
        expect = torch.zeros_like(w, dtype=torch.bool)
        expect[w.argsort(descending=True)[:5]] = True
        assert torch.equal(masks[name].flatten(), expect)


# ---------------------------------------------------------------------------------- register_method

@pytest.fixture
def registered():
    """Names registered by a test, unregistered afterwards even when it fails."""
    names = []
    yield names
    for name in names:
        widetopo.unregister_method(name)


def test_a_registered_method_is_one_entry(registered):
    extra = widetopo.register_method("half", HalfPerLayer, Schedule(rounds=1), "test method", aliases=("half_layer",))
    registered.append("half")
    assert get_method("half") is extra and get_method("HALF_LAYER") is extra
    assert "half" in method_names() and extra in all_methods()
    masks = widetopo.prune(tiny_mlp(), data(), 0.5, method="half_layer", scale=2.0, verbose=False)
    assert masks.meta["method"] == "half" and masks.meta["scale"] == 2.0 and masks.meta["rounds"] == 1
    assert [int(m.sum()) for m in masks.values()] == [5, 5]
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        widetopo.prune(tiny_mlp(), data(), 0.5, method="half", scale=0.0)


class TinyScorer(Scorer):
    """score = |theta| * x.abs().sum() over the pruning set: keeps the largest |theta| globally."""

    name = "tiny"
    data_dependent = True

    def score(self, ctx, batches):
        total = sum(float(b.x.abs().sum()) for b in batches)
        return [p.detach().abs() * total for p in ctx.prunable]


def test_register_method_prunes_by_name_with_its_schedule(registered):
    widetopo.register_method("tiny", TinyScorer, Schedule(rounds=2), "|theta| times the input mass")
    registered.append("tiny")
    model = tiny_mlp()
    masks = widetopo.prune(model, data(), 0.25, method="tiny", verbose=False)  # K = round(0.25 * 20) = 5
    assert masks.meta["method"] == "tiny" and masks.meta["rounds"] == 2 and masks.meta["restorations"] == 0
    w = torch.cat([model[0].weight.detach().abs().flatten(), model[2].weight.detach().abs().flatten()])
    expect = torch.zeros_like(w, dtype=torch.bool)
    expect[w.argsort(descending=True)[:5]] = True  # a positive factor never changes the order
    assert torch.equal(torch.cat([masks["0.weight"].flatten(), masks["2.weight"].flatten()]), expect)
    assert cli.main(["methods"]) == 0  # the CLI lists it like a built-in one


def test_register_method_refuses_a_clash_naming_it(registered):
    widetopo.register_method("tiny", TinyScorer, aliases=("tiny-alias",))
    registered.append("tiny")
    before = method_names(aliases=True)
    with pytest.raises(ValueError, match="method name 'snip' is already taken by method 'snip'"):
        widetopo.register_method("snip", TinyScorer)
    with pytest.raises(ValueError, match="method name 'widetopo_s' is already taken by method 'widetopo-s'"):
        widetopo.register_method("other", TinyScorer, aliases=("widetopo_s",))
    with pytest.raises(ValueError, match="method name 'tiny-alias' is already taken by method 'tiny'"):
        widetopo.register_method("tiny-alias", TinyScorer)
    with pytest.raises(ValueError, match="its name and aliases must all differ"):
        widetopo.register_method("other", TinyScorer, aliases=("x", "x"))
    assert method_names(aliases=True) == before  # nothing was added by a refused call


@pytest.mark.parametrize("args, kwargs, error, message", [
    (("Tiny", TinyScorer), {}, ValueError, "name must be a non-empty lower-case name.*'Tiny'"),
    (("", TinyScorer), {}, ValueError, "name must be a non-empty lower-case name"),
    (("tiny", TinyScorer()), {}, TypeError, "scorer must be a Scorer subclass .*instance of TinyScorer"),
    (("tiny", nn.Linear), {}, TypeError, "scorer must be a Scorer subclass"),
    (("tiny", TinyScorer), {"aliases": "t"}, TypeError, "aliases must be a list or tuple"),
    (("tiny", TinyScorer), {"aliases": ("ok", "Bad Name")}, ValueError, r"aliases\[1\] must be"),
    (("tiny", TinyScorer), {"schedule": {"rounds": 2}}, TypeError, "schedule must be a widetopo.Schedule"),
    (("tiny", TinyScorer), {"schedule": Schedule(rounds=0)}, ValueError, "rounds must be an integer >= 1"),
])
def test_register_method_checks_its_arguments_first(args, kwargs, error, message):
    before = method_names(aliases=True)
    with pytest.raises(error, match=message):
        widetopo.register_method(*args, **kwargs)
    assert method_names(aliases=True) == before


def test_register_method_refuses_options_shadowing_engine_options():
    @dataclasses.dataclass(frozen=True)
    class RoundsOptions(Options):
        rounds: int = option(1, "clashes with the engine's rounds")

    class Shadowing(TinyScorer):
        Options = RoundsOptions

    with pytest.raises(ValueError, match=r"option\(s\) \['rounds'\] have the name of an engine or selection option"):
        widetopo.register_method("shadowing", Shadowing)


def test_unregister_method_removes_only_added_methods():
    widetopo.register_method("tiny", TinyScorer, aliases=("tiny2",))
    assert widetopo.unregister_method("tiny").name == "tiny"
    for name in ("tiny", "tiny2"):
        with pytest.raises(ValueError, match="unknown method"):
            get_method(name)
    with pytest.raises(ValueError, match="no registered method named 'tiny'; added by register_method: none"):
        widetopo.unregister_method("tiny")
    with pytest.raises(ValueError, match="method 'snip' is built in and cannot be unregistered"):
        widetopo.unregister_method("snip")
    assert get_method("snip").name == "snip"


# ---------------------------------------------------------------------------------- CLI

def test_cli_methods_lists_schedules_and_options(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in all_methods():
        assert out.count(f"\n{m.name}") + out.startswith(m.name) >= 1
    assert "--option eps=0.0005" in out and "T = 10, R = 2 x (J = 50, T' = 10)" in out
    assert cli.main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == methods_markdown()


def test_cli_option_sets_a_method_option(tmp_path, capsys):
    out = tmp_path / "m.wtm"
    rc = cli.main(["-q", "prune", "--method", "snip", "--option", "batchnorm=eval", "--option", "calibrate_bn=true",
                   "--samples", "64",
                   "--density", "0.3", "-o", str(out)])
    assert rc == 0
    assert widetopo.load_masks(out).meta["calibrate_bn"] is True


@pytest.mark.parametrize("argv, message", [
    (["prune", "--method", "snip", "--option", "eps=1"], "unknown option 'eps'; allowed: batchnorm, calibrate_bn, ignore_index"),
    (["prune", "--option", "probes=0"], "probes must be an integer >= 1"),
    (["prune", "--option", "probes"], "expected key=value"),
    (["prune", "--method", "grasp2"], "invalid choice 'grasp2'"),
])
def test_cli_bad_option_is_a_usage_error(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_readme_method_table_is_the_registry():
    """The method table of README.md and docs/methods.md (and of any other docs page that has one)
    is generated from the registry (`widetopo methods --markdown`)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    begin = "<!-- methods-table: generated by `widetopo methods --markdown` -->\n"
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    holding = [p for p in pages if begin in p.read_text(encoding="utf-8")]
    assert {root / "README.md", root / "docs" / "methods.md"} <= set(holding)
    for page in holding:
        text = page.read_text(encoding="utf-8")
        assert text.count(begin) == 1, page
        start = text.index(begin)
        end = text.index("<!-- end methods-table -->", start)
        body = text[start:end].split("\n", 1)[1].strip()
        assert body == methods_markdown(), f"{page.name}: regenerate the table with `widetopo methods --markdown`"
