"""One-shot SNIP as the official configurations run it: BatchNorm in train mode, so that SNIP is
iterative SNIP (docs/design.md §5.4) with one round, mask for mask."""
import pytest
import torch

import widetopo
from scoring_nets import TinyCNN, make_model

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def labelled(n_batches=2, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)) for _ in range(n_batches)]


@pytest.mark.parametrize("density", [0.3, 0.05])
def test_snip_equals_iter_snip_with_one_round(density):
    model = make_model(TinyCNN, dtype=torch.float32)
    snip = widetopo.prune(model, labelled(), density, method="snip", verbose=False)
    iter_snip = widetopo.prune(model, labelled(), density, method="iter-snip", rounds=1, verbose=False)
    assert list(snip) == list(iter_snip)
    for name in snip:
        assert torch.equal(snip[name], iter_snip[name]), name
    # the BatchNorm mode matters on this model: eval mode (running statistics) keeps other weights
    evald = widetopo.prune(model, labelled(), density, method="snip", batchnorm="eval", verbose=False)
    assert any(not torch.equal(snip[n], evald[n]) for n in snip)


def test_snip_batchnorm_option_is_declared():
    from widetopo.methods import get_method

    opts = get_method("snip").scorer.Options()
    assert opts.batchnorm == "train"
    with pytest.raises(ValueError, match="batchnorm"):
        get_method("snip").scorer.Options(batchnorm="running")
