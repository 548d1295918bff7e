"""Which methods keep no weight of the query / key projections (attention collapse) at density 0.1.

Every registered method prunes, with its default schedule (what `widetopo.prune(model, data,
0.1, method=...)` does), seed 0, one batch of 16 random samples:

  hf-vit   transformers ViTForImageClassification from a config (hidden 32, 2 layers, 2 heads,
           8x8 images, 4 px patches, 4 classes): separate q_proj / k_proj / v_proj Linears
  hf-bert  transformers BertForSequenceClassification from a config (hidden 32, 2 layers,
           2 heads, vocabulary 64, 8 tokens, 4 classes): separate query / key / value Linears
  hf-gpt2  transformers GPT2LMHeadModel from a config (n_embd 32, 2 layers, 2 heads,
           vocabulary 64, 8 tokens; logits of the last token): fused c_attn Conv1D (in, out)
  vit      the zoo's vit (dim 32, depth 2, 4 heads, 16 px images, 4 classes): fused qkv Linear

Nothing is downloaded (models come from configs). A cell is the error when the method refuses
or fails, else what widetopo.sparsity.blocks.collapsed_parts finds among the q and k
projections of all layers: "works" (none collapsed), "works, q/k collapsed" (every q and every
k projection keeps no weight), or "works, n of m q/k collapsed"; heads with no weight inside
kept projections are counted as "+h heads". The last line of each model lists the v / other
tensors that collapsed too.

    python benchmarks/bench_collapse.py               # markdown table
    WIDETOPO_BENCH_METHODS=snip,synflow WIDETOPO_BENCH_MODELS=vit python benchmarks/bench_collapse.py

Environment: WIDETOPO_BENCH_METHODS, WIDETOPO_BENCH_MODELS (comma lists), WIDETOPO_BENCH_DENSITY
(0.1), WIDETOPO_BENCH_OUT=path.json (also write the cells there).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

import torch
from torch import nn

import widetopo
from widetopo.methods import method_names
from widetopo.models import build_model
from widetopo.sparsity.blocks import collapsed_parts, model_blocks

logging.getLogger("transformers").setLevel(logging.ERROR)

BATCH, TOKENS, VOCAB, CLASSES = 16, 8, 64, 4


class Logits(nn.Module):
    """forward(x) -> logits of a transformers model (the last token's for a language model)."""

    def __init__(self, model, key: str, last_token: bool = False):
        super().__init__()
        self.model, self.key, self.last_token = model, key, last_token

    def forward(self, x):
        out = self.model(**{self.key: x}).logits
        return out[:, -1] if self.last_token else out


def case(name: str):
    """(model, batches) of `name`, seeded."""
    import transformers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "hf-vit":
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=8, patch_size=4, num_labels=CLASSES)
        model = Logits(transformers.ViTForImageClassification(cfg), "pixel_values")
        x = torch.randn(BATCH, 3, 8, 8, generator=g)
    elif name == "hf-bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=VOCAB, max_position_embeddings=TOKENS, num_labels=CLASSES)
        model = Logits(transformers.BertForSequenceClassification(cfg), "input_ids")
        x = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
    elif name == "hf-gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=TOKENS,
                                      bos_token_id=0, eos_token_id=0)
        model = Logits(transformers.GPT2LMHeadModel(cfg), "input_ids", last_token=True)
        x = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
        return model, [(x, torch.randint(0, VOCAB, (BATCH,), generator=g))]
    elif name == "vit":
        model = build_model("vit", 3, CLASSES, 16, dim=32, depth=2, heads=4)
        x = torch.randn(BATCH, 3, 16, 16, generator=g)
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return model, [(x, torch.randint(0, CLASSES, (BATCH,), generator=g))]


MODELS = ("hf-vit", "hf-bert", "hf-gpt2", "vit")
_PART = re.compile(r"^(?P<name>.*)\[(?P<label>[qkv])(?: head (?P<head>\d+))?\]$")


def qk_collapse(masks, model) -> dict:
    """What collapsed_parts finds among the q and k projections of `model`: collapsed_qk of qk
    projections with no kept weight, heads with none inside the other q/k projections, and the
    other collapsed tensors / blocks; text: "", ", q/k collapsed" (every q and k projection) or
    ", n of m q/k collapsed", plus " (+h heads)"."""
    split = model_blocks(model, list(masks))
    qk = [(n, b.label) for n, bs in split.items() for b in bs if b.head is None and b.label in "qk"]
    dead, heads, others = set(), 0, []
    for p in collapsed_parts(masks, model):
        m = _PART.match(p)
        if p in masks:  # a whole tensor: a separate q/k projection, or any other tensor
            hit = [(n, lab) for n, lab in qk if n == p]
            dead.update(hit)
            if not hit:
                others.append(p)
        elif m and m["label"] in "qk" and m["head"] is None:
            dead.add((m["name"], m["label"]))
        elif m and m["label"] in "qk":
            heads += 1
        else:
            others.append(p)
    text = "" if not dead else ", q/k collapsed" if len(dead) == len(qk) else f", {len(dead)} of {len(qk)} q/k collapsed"
    if heads:
        text += f" (+{heads} heads)"
    return {"text": text, "collapsed_qk": len(dead), "qk": len(qk), "heads": heads, "other": others}


def cell(name: str, method: str, density: float) -> dict:
    model, batches = case(name)
    start = time.perf_counter()
    try:
        masks = widetopo.prune(model, batches, density, method=method, seed=0)
    except Exception as exc:  # noqa: BLE001 - the table reports any failure
        first = (str(exc).strip().splitlines() or [""])[0]
        return {"text": f"{type(exc).__name__}: {first[:100]}", "seconds": time.perf_counter() - start}
    out = qk_collapse(masks, model)
    out.update(text="works" + out["text"], density=masks.density, seconds=time.perf_counter() - start)
    return out


def main() -> int:
    torch.set_num_threads(1)
    methods = [m for m in os.environ.get("WIDETOPO_BENCH_METHODS", ",".join(method_names())).split(",") if m]
    models = [m for m in os.environ.get("WIDETOPO_BENCH_MODELS", ",".join(MODELS)).split(",") if m]
    density = float(os.environ.get("WIDETOPO_BENCH_DENSITY", "0.1"))
    print(f"# attention collapse at density {density}, widetopo {widetopo.__version__}, torch {torch.__version__}",
          flush=True)
    table = {}
    for name in models:
        for method in methods:
            table.setdefault(name, {})[method] = c = cell(name, method, density)
            print(f"#   {name:8} {method:14} {c['text']}  ({c['seconds']:.1f} s)"
                  + (f" other collapsed: {', '.join(c['other'])}" if c.get("other") else ""), flush=True)
    print("\n| model | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    errors: dict = {}
    for name, row in table.items():
        cells = [row[m]["text"] if row[m]["text"].startswith("works")
                 else f"fails ({errors.setdefault(row[m]['text'], len(errors) + 1)})" for m in methods]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for message, key in errors.items():
        print(f"\n({key}) {message}")
    out = os.environ.get("WIDETOPO_BENCH_OUT")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"density": density, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
