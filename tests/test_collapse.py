"""Collapse of attention projections and heads is visible: how fused tensors split
(widetopo.sparsity.blocks), Masks.stats, the report, mask files and the pruning log.

Every expected block and collapsed part is written out by hand from the module's shapes."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import widetopo
from widetopo.models import build_model
from widetopo.sparsity.blocks import Block, collapsed_parts, fused_blocks, model_blocks
from widetopo.sparsity.masks import Masks
from widetopo.sparsity.report import format_table, mask_report

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture
def transformers():
    """transformers (a test dependency: pyproject's `test` extra); models come from configs."""
    return pytest.importorskip("transformers", reason="transformers is in the `test` extra: pip install '.[test]'")


def _qkv_blocks(dim, width, heads):
    out = []
    for j, label in enumerate("qkv"):
        out.append(Block(label, dim, j * width, (j + 1) * width))
        h = width // heads
        out += [Block(label, dim, j * width + i * h, j * width + (i + 1) * h, i) for i in range(heads)]
    return out


class MHANet(nn.Module):
    def __init__(self, e=8, heads=2, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.head = nn.Linear(e, classes)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


# ------------------------------------------------------------------------------ how tensors split
def test_mha_in_proj_splits_into_q_k_v_and_heads():
    net = MHANet(e=8, heads=2)
    assert fused_blocks(net, "attn.in_proj_weight") == _qkv_blocks(0, 8, 2)
    assert fused_blocks(net, "attn.out_proj.weight") == []
    assert fused_blocks(net, "head.weight") == []


def test_mha_separate_projections():
    mha = nn.Sequential(nn.MultiheadAttention(4, 2, kdim=6, vdim=6))
    assert fused_blocks(mha, "0.k_proj_weight") == [Block("k", 0, 0, 4), Block("k", 0, 0, 2, 0), Block("k", 0, 2, 4, 1)]


def test_zoo_vit_qkv_linear():
    torch.manual_seed(0)
    vit = build_model("vit", in_channels=3, num_classes=4, image_size=8, dim=16, depth=1, heads=4)
    assert fused_blocks(vit, "blocks.0.attn.qkv.weight") == _qkv_blocks(0, 16, 4)
    assert fused_blocks(vit, "blocks.0.attn.proj.weight") == []


def test_gpt2_c_attn_splits_along_dim_1(transformers):
    cfg = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=11, n_positions=6,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert fused_blocks(model, "transformer.h.0.attn.c_attn.weight") == _qkv_blocks(1, 8, 2)
    assert fused_blocks(model, "transformer.h.0.mlp.c_fc.weight") == []


def test_hf_bert_and_vit_separate_projections_have_heads(transformers):
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=16, vocab_size=11, max_position_embeddings=6))
    heads = [Block("k", 0, 0, 8), Block("k", 0, 0, 4, 0), Block("k", 0, 4, 8, 1)]
    assert fused_blocks(bert, "encoder.layer.0.attention.self.key.weight") == heads
    assert fused_blocks(bert, "encoder.layer.0.intermediate.dense.weight") == []
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=16, image_size=4, patch_size=2))
    names = [n for n, _ in vit.named_parameters() if n.endswith("weight")]
    projections = {n: [b.label for b in bs if b.head is None] for n, bs in model_blocks(vit, names).items()}
    assert sorted(projections.values()) == [["k"], ["q"], ["v"]], projections


# ------------------------------------------------------------------------------ collapse reports
def _vit_masks():
    """Zoo vit (dim 16, 4 heads): q of block 0 keeps nothing, head 1 of k keeps nothing, v all."""
    torch.manual_seed(0)
    vit = build_model("vit", in_channels=3, num_classes=4, image_size=8, dim=16, depth=1, heads=4)
    names = widetopo.select_prunable(vit)
    params = dict(vit.named_parameters())
    masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    qkv = masks["blocks.0.attn.qkv.weight"]
    qkv[0:16] = False            # q
    qkv[16 + 4:16 + 8] = False   # k head 1 (rows 4..7 of k)
    masks["head.weight"][:] = False
    return vit, masks


def test_collapsed_parts_by_hand():
    vit, masks = _vit_masks()
    assert collapsed_parts(masks, vit) == ["blocks.0.attn.qkv.weight[q]", "blocks.0.attn.qkv.weight[k head 1]",
                                           "head.weight"]


def test_stats_report_and_file_name_the_collapsed_blocks(tmp_path):
    vit, masks = _vit_masks()
    stats = {s.name: s for s in Masks(masks).stats(vit, input_shape=(3, 8, 8))}
    qkv = stats["blocks.0.attn.qkv.weight"]
    assert qkv.collapsed == ("q", "k head 1")
    kept = {(b.label, b.head): b.kept for b in qkv.blocks}
    assert kept[("q", None)] == 0 and kept[("k", None)] == 12 * 16 and kept[("v", None)] == 16 * 16
    assert kept[("k", 1)] == 0 and kept[("k", 0)] == 4 * 16
    assert stats["head.weight"].collapsed == ("head.weight",) and stats["head.weight"].blocks is None
    assert stats["blocks.0.fc1.weight"].collapsed == ()

    rep = mask_report(masks, vit, input_shape=(3, 8, 8))
    want = ["blocks.0.attn.qkv.weight[q]", "blocks.0.attn.qkv.weight[k head 1]", "head.weight"]
    assert rep["collapsed"] == ["head.weight"] and rep["collapsed_parts"] == want
    text = format_table(rep)
    assert "2 collapsed attention projection(s)/head(s) (no kept weight): blocks.0.attn.qkv.weight[q], " \
           "blocks.0.attn.qkv.weight[k head 1]" in text

    # a file written from masks that know their blocks reports the same without the model
    carried = Masks(masks, {"method": "hand"}, blocks=model_blocks(vit, list(masks)))
    carried.save(tmp_path / "vit.wtm")
    assert mask_report(Masks.load(tmp_path / "vit.wtm"))["collapsed_parts"] == want
    assert [s.collapsed for s in Masks.load(tmp_path / "vit.wtm").stats()] == [s.collapsed for s in stats.values()]
    assert mask_report(Masks.load(tmp_path / "vit.wtm", model=vit), vit)["collapsed_parts"] == want


def test_prune_log_names_collapsed_projection_and_head(caplog):
    """Magnitude pruning of an MHA whose q rows and k head 1 rows are 1000x smaller than the rest
    keeps none of them at density 0.3 (those rows are 1/2 of in_proj; the rest suffice)."""
    torch.manual_seed(0)
    net = MHANet(e=8, heads=2)
    with torch.no_grad():
        w = net.attn.in_proj_weight
        w.copy_(w.sign() * (0.5 + w.abs()))
        w[0:8] *= 1e-3          # q
        w[8 + 4:16] *= 1e-3     # k head 1
    x = torch.randn(4, 5, 8)
    with caplog.at_level(logging.WARNING, logger="widetopo.engine.pruner"):
        masks = widetopo.prune(net, [(x, torch.arange(4) % 3)], 0.3, method="magnitude", seed=0)
    m = masks["attn.in_proj_weight"]
    assert not m[0:8].any() and not m[12:16].any() and m[8:12].any() and m[16:24].any()
    assert masks.blocks["attn.in_proj_weight"] == _qkv_blocks(0, 8, 2)
    msgs = [r.getMessage() for r in caplog.records if "attention projection" in r.getMessage()]
    assert msgs == ["no weights kept in 2 attention projection(s)/head(s) (the tensor keeps weights, these blocks "
                    "of it none): attn.in_proj_weight[q], attn.in_proj_weight[k head 1]"]


def test_rename_keeps_blocks():
    vit, masks = _vit_masks()
    carried = Masks({f"model.{n}": m for n, m in masks.items()}, {}, blocks={f"model.{n}": b for n, b in
                                                                               model_blocks(vit, list(masks)).items()})
    bare = carried.rename(strip_prefix="model.")
    assert collapsed_parts(bare) == collapsed_parts(masks, vit)
