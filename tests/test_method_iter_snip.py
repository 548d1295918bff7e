"""Iterative SNIP (docs/design.md §5.4) against a hand-written SNIP through the mask in float64."""
import pytest
import torch
from torch import nn

import widetopo
from method_checks import (bn_net, check_resume, check_run_properties, check_two_processes, labelled,
                           segmentation_pairs)
from references import per_pixel_loss, reference_iter_snip
from scoring_nets import TinyCNN, make_ctx, make_model
from widetopo.methods import get_method
from widetopo.scores import Batch
from widetopo.scores.iter_snip import IterSNIPScorer

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def batches_of(pairs):
    return [Batch(i, x, y) for i, (x, y) in enumerate(pairs)]


def test_registry_entry():
    m = get_method("iter_snip")
    assert m.name == "iter-snip" and get_method("ITER-SNIP") is m
    assert m.schedule.rounds == 100 and m.schedule.restorations == 0
    assert m.defaults() == {"ignore_index": -100}
    s = m.make_scorer()
    assert isinstance(s, IterSNIPScorer) and s.needs_targets and s.data_dependent and not s.decay
    with pytest.raises(ValueError, match="ignore_index"):
        m.make_options(ignore_index=1.5)


def test_one_round_equals_hand_written_snip_through_mask():
    model = make_model(TinyCNN)
    ctx = make_ctx(model)  # random masks, ctx.params hold theta * m
    raw = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    pairs = [(torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g))
             for _ in range(3)]
    scorer = IterSNIPScorer()
    signed = scorer.score(ctx, batches_of(pairs))
    assert any(bool((s < 0).any()) for s in signed)  # signed until finalize (abs of the sum)
    got = scorer.finalize(ctx, signed)
    ref = reference_iter_snip(model, raw, ctx.masks, ctx.names, pairs)
    for n, a, r, m in zip(ctx.names, got, ref, ctx.masks):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13, msg=n)
        assert torch.all(a[~m] == 0)
    # the test tells BatchNorm modes apart: with eval-mode BN (SNIP's batchnorm="eval") the scores differ
    snip = get_method("snip").make_scorer(batchnorm="eval")
    other = snip.finalize(ctx, snip.score(ctx, batches_of(pairs)))
    assert not all(torch.allclose(a, b) for a, b in zip(got, other))


def test_first_round_of_prune_keeps_the_top_of_the_reference():
    model = bn_net()
    data = labelled(3)
    masks = widetopo.prune(model, data, 0.3, method="iter-snip", rounds=1, verbose=False)
    names = list(masks)
    raw = {n: p.detach() for n, p in model.named_parameters()}
    ref = reference_iter_snip(model, raw, [torch.ones_like(raw[n], dtype=torch.bool) for n in names], names, data)
    flat = torch.cat([r.flatten() for r in ref])
    keep = int(0.3 * flat.numel() + 0.5)
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.topk(keep).indices] = True
    assert torch.equal(torch.cat([masks[n].flatten() for n in names]), expected)


class Recording(IterSNIPScorer):
    """Records the masks it was given and the finalized scores of every round."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def finalize(self, ctx, scores):
        out = super().finalize(ctx, scores)
        self.seen.append(([m.clone() for m in ctx.masks], [s.clone() for s in out]))
        return out


def test_masks_are_nested_and_pruned_entries_score_zero():
    scorer = Recording()
    masks = widetopo.prune(bn_net(), labelled(2), 0.05, method=scorer, rounds=3, verbose=False)
    rounds = [m for m, _ in scorer.seen] + [list(masks.values())]
    assert len(rounds) == 4
    for earlier, later in zip(rounds, rounds[1:]):
        for a, b in zip(earlier, later):
            assert not bool((b & ~a).any())  # nothing comes back
    for ms, ss in scorer.seen:
        for m, s in zip(ms, ss):
            assert torch.all(s[~m] == 0)  # gradient through the mask: exactly 0, not just small
    n = sum(m.numel() for m in masks.values())
    kept = [sum(int(x.sum()) for x in r) for r in rounds]
    assert kept == [n] + [int(0.05 ** (t / 3) * n + 0.5) for t in (1, 2, 3)]


def test_segmentation_ignore_index_against_per_pixel_loop():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1)).double()
    pairs = segmentation_pairs()

    names = [n for n, p in net.named_parameters() if p.dim() > 1]
    raw = {n: p.detach() for n, p in net.named_parameters()}
    ones = [torch.ones_like(raw[n], dtype=torch.bool) for n in names]
    ref = reference_iter_snip(net, raw, ones, names, pairs, loss_fn=per_pixel_loss)
    got = widetopo.saliency(net, pairs, "iter-snip", ignore_index=255)
    for n, r in zip(names, ref):
        torch.testing.assert_close(got[n], r, rtol=1e-10, atol=1e-13, msg=n)


def test_needs_targets():
    with pytest.raises(ValueError, match="targets"):
        widetopo.prune(bn_net(), [x for x, _ in labelled(2)], 0.5, method="iter-snip", rounds=2, verbose=False)


def test_basic_properties():
    check_run_properties("iter-snip", bn_net, labelled(3), 0.1, rounds=3)


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resume_after_kill(tmp_path, monkeypatch, kill_after):
    check_resume(tmp_path, monkeypatch, "iter-snip", bn_net, labelled(2), 0.1, kill_after, rounds=3)


def test_two_processes_equal_one():
    check_two_processes("iter-snip")
