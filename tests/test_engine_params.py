"""select_prunable: the default set, module types, norm/bias flags, name patterns, explicit
names, torch.nn.utils.prune-wrapped modules, and the errors."""
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from widetopo.sparsity.selection import select_prunable


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 2)
        self.c2 = nn.Conv2d(3, 4, 3, bias=False)
        self.c3 = nn.Conv3d(4, 2, 1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(5)
        self.emb = nn.Embedding(10, 5)
        self.head = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
        self.scale = nn.Parameter(torch.ones(2))


def test_default_is_conv_and_linear_weights_in_model_order():
    assert select_prunable(Zoo()) == ["c1.weight", "c2.weight", "c3.weight", "head.0.weight", "head.2.weight"]


def test_bias_and_norm_flags():
    assert select_prunable(Zoo(), include_bias=True) == [
        "c1.weight", "c1.bias", "c2.weight", "c3.weight", "c3.bias",
        "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias",
    ]
    assert select_prunable(Zoo(), include_norm=True) == [
        "c1.weight", "c2.weight", "c3.weight", "bn.weight", "ln.weight", "head.0.weight", "head.2.weight",
    ]
    both = select_prunable(Zoo(), include_norm=True, include_bias=True)
    assert "bn.bias" in both and "ln.bias" in both and "emb.weight" not in both and "scale" not in both


def test_types_and_pattern():
    assert select_prunable(Zoo(), include=nn.Linear) == ["head.0.weight", "head.2.weight"]
    assert select_prunable(Zoo(), include=(nn.Embedding, nn.Conv2d)) == ["c2.weight", "emb.weight"]
    assert select_prunable(Zoo(), pattern=r"^head\.") == ["head.0.weight", "head.2.weight"]
    assert select_prunable(Zoo(), pattern=r"c[12]") == ["c1.weight", "c2.weight"]


def test_explicit_names_in_model_order():
    # named_parameters() yields the module's own parameters ("scale") before its children's
    assert select_prunable(Zoo(), names=["c1.weight", "scale"]) == ["scale", "c1.weight"]
    assert select_prunable(Zoo(), names="scale") == ["scale"]


def test_nn_utils_prune_wrapped_module_uses_weight_orig():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    torch.nn.utils.prune.identity(model[0], "weight")
    assert select_prunable(model) == ["0.weight_orig", "1.weight"]


def test_shared_weights_are_listed_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert select_prunable(model) == ["0.weight"]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(pattern="^nope$"), ValueError, "no prunable parameters selected.*matching pattern '\\^nope\\$'"),
        (dict(include=nn.GRU), ValueError, r"no prunable parameters selected: .*\(GRU\)"),
        (dict(names=["c1.weight", "missing"]), ValueError, r"unknown parameter name\(s\) \['missing'\]"),
        (dict(names=["c1.weight", "c1.weight"]), ValueError, "duplicate"),
        (dict(names=[]), ValueError, "no prunable parameters selected"),
        (dict(names=["c1.weight"], pattern="c"), ValueError, "do not combine"),
        (dict(include="Conv2d"), TypeError, "include must contain nn.Module subclasses"),
        (dict(include=[int]), TypeError, "include must contain nn.Module subclasses"),
        (dict(pattern="("), ValueError, "pattern: not a valid regular expression"),
    ],
)
def test_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        select_prunable(Zoo(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        select_prunable([nn.Linear(2, 2)])


def test_default_adds_transposed_convs_and_attention_projections():
    model = nn.Sequential(nn.ConvTranspose1d(2, 3, 2), nn.ConvTranspose3d(3, 2, 1, groups=1),
                          nn.MultiheadAttention(4, 2))
    assert select_prunable(model) == ["0.weight", "1.weight", "2.in_proj_weight", "2.out_proj.weight"]


def test_tied_embedding_first_is_selected_once_through_the_linear():
    model = Zoo()
    model.tied = nn.Linear(5, 10, bias=False)
    model.tied.weight = model.emb.weight  # Embedding comes first in named_parameters()
    assert select_prunable(model) == ["c1.weight", "c2.weight", "c3.weight", "emb.weight", "head.0.weight", "head.2.weight"]
    assert select_prunable(model, include=nn.Embedding) == ["emb.weight"]


def test_pattern_alone_reaches_non_default_parameters():
    assert select_prunable(Zoo(), pattern="emb|scale") == ["scale", "emb.weight"]
    assert select_prunable(Zoo(), pattern="^c1", include_bias=True) == ["c1.weight", "c1.bias"]
    assert select_prunable(Zoo(), pattern="^bn", include_norm=True) == ["bn.weight"]
