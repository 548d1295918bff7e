"""select_prunable on attention, recurrent, embedding, token and tied parameters; the official
ViT selection; pattern= over every parameter; end-to-end pruning of these selections."""
import pytest
import torch
from torch import nn

import widetopo
from arch_models import TiedLM
from widetopo.sparsity.selection import parameter_owners, select_prunable

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, one pre-norm block (qkv Linear, GELU
    MLP), final LayerNorm, head: the parameter layout of a timm/DINO ViT."""

    def __init__(self, dim=8, patch=4, image=8, classes=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.heads = 2

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(10, 4, batch_first=True)
        self.cell = nn.RNNCell(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        h, _ = self.gru(h)
        h = self.cell(h[:, -1])
        return self.out(h)


def test_default_set_covers_attention_and_transposed_convs():
    model = nn.Sequential(
        nn.ConvTranspose2d(2, 3, 2), nn.Flatten(),
        nn.Unflatten(1, (3, 9)),
        nn.TransformerEncoderLayer(9, 3, 6, batch_first=True),
    )
    assert select_prunable(model) == [
        "0.weight",
        "3.self_attn.in_proj_weight", "3.self_attn.out_proj.weight",
        "3.linear1.weight", "3.linear2.weight",
    ]
    mha = nn.MultiheadAttention(6, 2, kdim=4, vdim=5)
    assert select_prunable(mha) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_include_any_module_type_selects_its_matrix_parameters():
    model = Recurrent()
    assert select_prunable(model, include=nn.LSTM) == [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l0_reverse", "lstm.weight_hh_l0_reverse",
        "lstm.weight_ih_l1", "lstm.weight_hh_l1", "lstm.weight_ih_l1_reverse", "lstm.weight_hh_l1_reverse",
    ]
    assert select_prunable(model, include=(nn.GRU, nn.RNNCell, nn.Embedding)) == [
        "emb.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "cell.weight_ih", "cell.weight_hh",
    ]
    assert select_prunable(model, include=nn.GRU, include_bias=True) == [
        "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0",
    ]
    mha = nn.Sequential(nn.MultiheadAttention(6, 2, add_bias_kv=True))
    assert select_prunable(mha, include=nn.MultiheadAttention) == ["0.in_proj_weight", "0.out_proj.weight"]
    assert select_prunable(mha, include=nn.MultiheadAttention, include_bias=True) == [
        "0.in_proj_weight", "0.in_proj_bias", "0.bias_k", "0.bias_v", "0.out_proj.weight", "0.out_proj.bias",
    ]
    assert select_prunable(TinyViT(), include=TinyViT) == ["cls_token", "pos_embed"]
    lstm_proj = nn.LSTM(4, 6, proj_size=3)
    assert select_prunable(lstm_proj, include=nn.LSTM) == ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"]


def test_official_vit_selection_with_norm_and_tokens():
    vit = TinyViT()
    assert select_prunable(vit, include_norm=True, include_tokens=True) == [
        "cls_token", "pos_embed", "patch_embed.weight", "norm1.weight", "qkv.weight", "proj.weight",
        "norm2.weight", "mlp.0.weight", "mlp.2.weight", "norm.weight", "head.weight",
    ]
    assert select_prunable(vit) == [
        "patch_embed.weight", "qkv.weight", "proj.weight", "mlp.0.weight", "mlp.2.weight", "head.weight",
    ]
    # tokens include Embedding weights, not the biases of custom modules
    assert select_prunable(Recurrent(), include=nn.Linear, include_tokens=True) == ["emb.weight", "out.weight"]


def test_pattern_selects_any_parameter_but_biases_and_norms_on_request():
    vit = TinyViT()
    assert select_prunable(vit, pattern="token|embed") == ["cls_token", "pos_embed", "patch_embed.weight"]
    assert select_prunable(vit, pattern="^norm", include_norm=True) == [
        "norm1.weight", "norm2.weight", "norm.weight",
    ]
    assert select_prunable(vit, pattern="^norm", include_norm=True, include_bias=True) == [
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm.weight", "norm.bias",
    ]
    with pytest.raises(ValueError, match="no prunable parameters selected.*matching pattern '\\^norm'"):
        select_prunable(vit, pattern="^norm")
    assert select_prunable(Recurrent(), pattern=r"lstm\..*_l1") == [
        "lstm.weight_ih_l1", "lstm.weight_hh_l1", "lstm.weight_ih_l1_reverse", "lstm.weight_hh_l1_reverse",
    ]
    # with include, pattern filters that selection
    assert select_prunable(Recurrent(), include=nn.LSTM, pattern="reverse$") == [
        "lstm.weight_ih_l0_reverse", "lstm.weight_hh_l0_reverse", "lstm.weight_ih_l1_reverse", "lstm.weight_hh_l1_reverse",
    ]


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="include_tokens must be True or False"):
        select_prunable(TinyViT(), include_tokens="yes")


def test_tied_weight_is_one_tensor_under_its_canonical_name():
    model = TiedLM()
    assert select_prunable(model) == ["emb.weight", "mid.weight"]  # selected through the head
    owners = parameter_owners(model)["emb.weight"]
    assert [(prefix, local) for prefix, _, local in owners] == [("emb", "weight"), ("head", "weight")]
    # head first: the same single tensor, named after the head
    flipped = nn.Sequential(nn.Linear(4, 7, bias=False), nn.Embedding(7, 4))
    flipped[1].weight = flipped[0].weight
    assert select_prunable(flipped) == ["0.weight"]
    assert select_prunable(flipped, include=nn.Embedding) == ["0.weight"]


@pytest.mark.parametrize("method", ["widetopo-s", "snip", "magnitude"])
def test_prune_tied_lm_keeps_the_tie_and_exact_k(method):
    torch.manual_seed(0)
    model = TiedLM()
    x = torch.randint(0, 7, (6, 5))
    data = [(x, torch.randint(0, 7, (6,)))]
    # token inputs: the ITA term perturbs the embedding output (docs/design.md §2.5)
    opts = dict(rounds=2, restorations=1, restore_steps=2, restore_rounds=1) if method == "widetopo-s" else {}
    masks = widetopo.prune(model, data, 0.5, method=method, verbose=False, **opts)
    assert list(masks) == ["emb.weight", "mid.weight"]
    assert masks.kept == round(0.5 * (28 + 16))
    assert model.head.weight is model.emb.weight


def test_prune_vit_official_selection_and_recurrent_net():
    torch.manual_seed(0)
    vit = TinyViT()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    masks = widetopo.prune(vit, [torch.randn(4, 1, 8, 8)], 0.3, method="widetopo-s", verbose=False,
                           include_norm=True, include_tokens=True, rounds=2, restorations=1, restore_steps=2,
                           restore_rounds=1)
    assert "cls_token" in masks and "pos_embed" in masks and "norm1.weight" in masks
    assert masks.kept == round(0.3 * masks.numel)
    for n, p in vit.named_parameters():
        assert torch.equal(p, before[n])
    rec = Recurrent()
    masks = widetopo.prune(rec, [torch.randint(0, 11, (4, 3))], 0.3, method="widetopo-s", verbose=False,
                           include=(nn.LSTM, nn.GRU, nn.RNNCell, nn.Linear), rounds=2, restorations=0, mu2=0.0)
    assert "lstm.weight_hh_l1_reverse" in masks and masks.kept == round(0.3 * masks.numel)
