"""Dict batches (keyword inputs with an attention mask and labels, docs/design.md §2.5) under
torch.distributed: 2 gloo ranks, each passing its own part of the pruning set (per-rank data),
must give the masks of ONE process over the union, for a data-dependent sum (snip with the
model's own loss, widetopo-s perturbing the embedding output), a first-batch data-free method
(synflow: global batch 0 is broadcast, key by key) and one that gathers every batch (pags); a
forward_fn hook passes the ranks' agreement check (it is compared by its qualified name)."""
import datetime
import os

import pytest
import torch
from torch import nn

from gloo import spawn

pytestmark = [pytest.mark.needs_kernel("global_threshold", "density_decay_", "restoration_scores", "apply_masks_",
                                       "mask_stats"), pytest.mark.usefixtures("one_thread")]

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

COUNTS = [2, 1]  # batches of rank 0 and rank 1
DENSITY = 0.3
RUNS = {
    "snip": dict(verbose=False),
    "widetopo-s": dict(rounds=2, restorations=0, seed=3, verbose=False),
    "synflow": dict(rounds=2, verbose=False),
    "pags": dict(population=3, min_kept=0, verbose=False),
    "forward_fn": dict(verbose=False),
}


class TokenNet(nn.Module):
    """forward(input_ids, attention_mask, labels=None) -> {"logits", "loss"} like a HF head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        h = torch.relu(self.fc1(self.emb(input_ids))) * attention_mask[..., None]
        logits = self.fc2(h.sum(1) / attention_mask.sum(1, keepdim=True))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def forward_fn(model, inputs):
    return model(**inputs)["logits"] * 2.0


def make_model():
    torch.manual_seed(0)
    return TokenNet().double()


def union():
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(sum(COUNTS)):
        mask = torch.ones(4, 5, dtype=torch.long)
        mask[0, 3:] = 0
        out.append({"input_ids": torch.randint(0, 11, (4, 5), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, 3, (4,), generator=g)})
    return out


def part(rank):
    start = sum(COUNTS[:rank])
    return union()[start:start + COUNTS[rank]]


def _run(method, data):
    import widetopo

    opts = dict(RUNS[method])
    if method == "forward_fn":
        return widetopo.prune(make_model(), data, DENSITY, method="snip", forward_fn=forward_fn, **opts)
    return widetopo.prune(make_model(), data, DENSITY, method=method, **opts)


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for method in RUNS:
            masks = _run(method, part(rank))
            out[method] = dict(masks)
            out[f"{method} split"] = masks.meta["data_split"]
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_per_rank_dict_batches_give_the_masks_of_one_process(tmp_path):
    spawn(_worker, 2, str(tmp_path), timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for method in RUNS:
        single = _run(method, union())
        for rank, result in enumerate(ranks):
            assert result[f"{method} split"] == "per_rank", (method, rank)
            got = result[method]
            assert list(got) == list(single) and all(torch.equal(got[n], single[n]) for n in got), (method, rank)


class FlagNet(TokenNet):
    """TokenNet with a non-tensor keyword that changes the forward: sharpen squares the hidden
    units instead of the ReLU (what output_hidden_states=... or use_cache=... are to a HF model);
    other keywords are accepted and ignored."""

    def forward(self, input_ids, attention_mask, labels=None, sharpen=False, **ignored):
        h = self.fc1(self.emb(input_ids))
        h = (h * h if sharpen else torch.relu(h)) * attention_mask[..., None]
        logits = self.fc2(h.sum(1) / attention_mask.sum(1, keepdim=True))
        return {"logits": logits}


SHARPEN = [True, False, False]  # per global batch: rank 1's own batch differs from global batch 0
FLAG_RUNS = {"synflow": dict(rounds=2, verbose=False), "pags": dict(population=3, min_kept=0, verbose=False)}


def flagged(keep_flag=True):
    out = union()
    for batch, sharpen in zip(out, SHARPEN):
        batch.pop("attention_mask")  # (all ones below: the squares then matter in every sample)
        batch["attention_mask"] = torch.ones(4, 5, dtype=torch.long)
        if keep_flag:
            batch["sharpen"] = sharpen
    return out


def _flag_run(method, data):
    import widetopo

    torch.manual_seed(0)
    return widetopo.prune(FlagNet().double(), data, DENSITY, method=method, data_split="per_rank",
                          **FLAG_RUNS[method])


def _flag_worker(rank, world, port, outdir):
    import threading

    from gloo import failure

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=20))
    try:
        start = sum(COUNTS[:rank])
        mine = flagged()[start:start + COUNTS[rank]]
        out = {method: dict(_flag_run(method, mine)) for method in FLAG_RUNS}
        unpicklable = [dict(b, lock=threading.Lock()) for b in mine]
        out["unpicklable"] = failure(lambda: _flag_run("synflow", unpicklable))
        missing = [{k: v for k, v in b.items() if k != "sharpen"} for b in mine] if rank == 1 else mine
        out["missing"] = failure(lambda: _flag_run("synflow", missing))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_non_tensor_entries_travel_with_their_batch(tmp_path):
    """Per-rank dict batches with a non-tensor entry (sharpen, different per batch): data-free
    methods, which get global batch 0 (synflow) or every batch (pags) from the rank holding it,
    use each batch's own value, so both ranks give the masks of one process over the union (the
    flag changes those masks: the comparison can fail). A value that does not pickle, and a key
    that only some ranks' batches hold, are errors on both ranks."""
    spawn(_flag_worker, 2, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for method in FLAG_RUNS:
        single = _flag_run(method, flagged())
        unflagged = _flag_run(method, flagged(keep_flag=False))
        assert not all(torch.equal(single[n], unflagged[n]) for n in single), method
        for rank, result in enumerate(ranks):
            got = result[method]
            assert list(got) == list(single) and all(torch.equal(got[n], single[n]) for n in got), (method, rank)
    for rank, result in enumerate(ranks):
        kind, message, seconds = result["unpicklable"]
        assert kind == "TypeError" and "entry 'lock' of dict batch 0" in message and "does not pickle" in message
        kind, message, seconds = result["missing"]
        assert kind == "RankMismatchError" and "input samples" in message and '"sharpen": "(not a tensor)"' in message
        assert seconds < 10
