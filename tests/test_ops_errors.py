"""Every error path: the wrappers raise TypeError/ValueError naming the argument, the compiled ops
reject the same bad input when called directly through torch.ops.widetopo, and a failed call
leaves every tensor it was given (masks, scores, parameters) unchanged."""
import math

import pytest
import torch

import widetopo_ext as W

OPS = torch.ops.widetopo
TORCH_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def f32(*shape):
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) / 7.0


def bmask(*shape):
    return (torch.arange(math.prod(shape)) % 3 == 0).reshape(shape)


def good():
    """A valid call's arguments: scores/tensors (3, 4), (5,), (2, 3, 2); masks alike; noise (O, I)."""
    shapes = [(3, 4), (5,), (2, 3, 2)]
    return dict(s=[f32(*s) for s in shapes], m=[bmask(*s) for s in shapes],
                noise=[torch.zeros(3, 4), torch.empty(0), torch.zeros(2, 3)])


def tensors_in(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(tensors_in(a))
    return out


def assert_unchanged(args, snapshot):
    for t, c in zip(tensors_in(args), snapshot):
        if t.is_meta:
            continue
        torch.testing.assert_close(t, c, rtol=0, atol=0, equal_nan=True)


def call_and_check(fn, args, exc, match):
    snapshot = [t.clone() for t in tensors_in(args)]
    with pytest.raises(exc, match=match):
        fn(*args)
    assert_unchanged(args, snapshot)


def case(**kw):
    g = good()
    g.update(kw)
    return g


# (id, wrapper name, builder -> args, exception, regex naming the argument)
WRAPPER_CASES = [
    # global_threshold
    ("gt-single-tensor", "global_threshold", lambda g: (g["s"][0], g["m"], 3), TypeError, r"scores must be a list"),
    ("gt-not-tensor", "global_threshold", lambda g: ([g["s"][0], 1.0, g["s"][2]], g["m"], 3), TypeError, r"scores\[1\]"),
    ("gt-masks-none", "global_threshold", lambda g: (g["s"], None, 3), TypeError, r"masks"),
    ("gt-length", "global_threshold", lambda g: (g["s"], g["m"][:2], 3), ValueError, r"masks.*3"),
    ("gt-mask-dtype", "global_threshold", lambda g: (g["s"], [g["m"][0], g["m"][1].to(torch.uint8), g["m"][2]], 3),
     TypeError, r"masks\[1\].*bool"),
    ("gt-mask-shape", "global_threshold", lambda g: (g["s"], [g["m"][0], g["m"][1], bmask(3, 2, 2)], 3),
     ValueError, r"masks\[2\].*shape"),
    ("gt-int-scores", "global_threshold", lambda g: ([s.to(torch.int32) for s in g["s"]], g["m"], 3),
     TypeError, r"scores\[0\].*float32"),
    ("gt-mixed-dtype", "global_threshold", lambda g: ([g["s"][0], g["s"][1].double(), g["s"][2]], g["m"], 3),
     TypeError, r"scores\[1\].*float64"),
    ("gt-keep-float", "global_threshold", lambda g: (g["s"], g["m"], 3.0), TypeError, r"keep"),
    ("gt-keep-bool", "global_threshold", lambda g: (g["s"], g["m"], True), TypeError, r"keep"),
    ("gt-keep-neg", "global_threshold", lambda g: (g["s"], g["m"], -1), ValueError, r"keep.*\[0, .*29"),
    ("gt-keep-big", "global_threshold", lambda g: (g["s"], g["m"], 30), ValueError, r"keep.*29"),
    ("gt-mode", "global_threshold", lambda g: (g["s"], g["m"], 3, "approx"), ValueError, r"mode.*exact.*official"),
    ("gt-overlap", "global_threshold", lambda g: (g["s"], [g["m"][0], g["m"][1], bmask(1, 3, 2).expand(2, 3, 2)], 3),
     ValueError, r"masks\[2\].*memory"),
    ("gt-device", "global_threshold", lambda g: (g["s"], [g["m"][0], g["m"][1].to("meta"), g["m"][2]], 3),
     ValueError, r"masks\[1\].*device"),
    # density_decay_
    ("dd-exp-nan", "density_decay_", lambda g: (g["s"], g["m"], math.nan), ValueError, r"exponent.*finite"),
    ("dd-exp-inf", "density_decay_", lambda g: (g["s"], g["m"], math.inf), ValueError, r"exponent.*finite"),
    ("dd-exp-str", "density_decay_", lambda g: (g["s"], g["m"], "1"), TypeError, r"exponent"),
    ("dd-exp-bool", "density_decay_", lambda g: (g["s"], g["m"], True), TypeError, r"exponent"),
    ("dd-mask-shape", "density_decay_", lambda g: (g["s"], [g["m"][0], g["m"][1], bmask(2, 2, 3)], 1.0), ValueError,
     r"masks\[2\].*shape"),
    ("dd-mask-dtype", "density_decay_", lambda g: (g["s"], [m.float() for m in g["m"]], 1.0), TypeError, r"masks\[0\]"),
    ("dd-length", "density_decay_", lambda g: (g["s"][:1], g["m"], 1.0), ValueError, r"masks"),
    ("dd-int", "density_decay_", lambda g: ([s.long() for s in g["s"]], g["m"], 1.0), TypeError, r"scores\[0\]"),
    ("dd-overlap", "density_decay_", lambda g: (g["s"][:2] + [f32(1, 3, 2).expand(2, 3, 2)], g["m"], 1.0), ValueError,
     r"scores\[2\].*memory"),
    # restoration_scores
    ("rs-noise-none", "restoration_scores", lambda g: (g["m"], None), TypeError, r"noise"),
    ("rs-noise-length", "restoration_scores", lambda g: (g["m"], g["noise"][:2]), ValueError, r"noise"),
    ("rs-noise-shape", "restoration_scores", lambda g: (g["m"], [torch.zeros(4, 3), g["noise"][1], g["noise"][2]]),
     ValueError, r"noise\[0\].*\(3, 4\)"),
    ("rs-noise-full-shape", "restoration_scores", lambda g: (g["m"], [g["noise"][0], None, torch.zeros(2, 3, 2)]),
     ValueError, r"noise\[2\]"),
    ("rs-noise-dtype", "restoration_scores", lambda g: (g["m"], [g["noise"][0].double(), None, g["noise"][2]]),
     TypeError, r"noise\[0\].*float32"),
    ("rs-noise-missing", "restoration_scores", lambda g: (g["m"], [None, None, g["noise"][2]]), TypeError, r"noise\[0\]"),
    ("rs-scale", "restoration_scores", lambda g: (g["m"], g["noise"], math.nan), ValueError, r"noise_scale"),
    ("rs-mask-dtype", "restoration_scores", lambda g: ([m.int() for m in g["m"]], g["noise"]), TypeError, r"masks\[0\]"),
    ("rs-device", "restoration_scores", lambda g: (g["m"], [g["noise"][0].to("meta"), None, g["noise"][2]]),
     ValueError, r"noise\[0\].*device"),
    # accumulate_score_
    ("ac-a-length", "accumulate_score_", lambda g: (g["s"], g["s"][:2]), ValueError, r"\ba\b"),
    ("ac-a-shape", "accumulate_score_", lambda g: (g["s"], [g["s"][0], f32(6), g["s"][2]]), ValueError, r"a\[1\].*shape"),
    ("ac-b-shape", "accumulate_score_", lambda g: (g["s"], g["s"], [g["s"][0], g["s"][1], f32(2, 2, 3)]), ValueError,
     r"b\[2\].*shape"),
    ("ac-a-dtype", "accumulate_score_", lambda g: (g["s"], [s.double() for s in g["s"]]), TypeError, r"a\[0\].*float64"),
    ("ac-b-dtype", "accumulate_score_", lambda g: (g["s"], g["s"], [s.half() for s in g["s"]]), TypeError, r"b\[0\]"),
    ("ac-mask-shape", "accumulate_score_", lambda g: (g["s"], g["s"], None, [g["m"][0], bmask(1, 5), g["m"][2]]),
     ValueError, r"masks\[1\].*shape"),
    ("ac-absolute", "accumulate_score_", lambda g: (g["s"], g["s"], None, None, 1), TypeError, r"absolute"),
    ("ac-overlap", "accumulate_score_", lambda g: (g["s"][:2] + [f32(2, 1, 1).expand(2, 3, 2)], g["s"]), ValueError,
     r"scores\[2\].*memory"),
    ("ac-scores-int", "accumulate_score_", lambda g: ([s.long() for s in g["s"]], [s.long() for s in g["s"]]),
     TypeError, r"scores\[0\]"),
    # masked_sq_norm
    ("sq-mask-shape", "masked_sq_norm", lambda g: (g["s"], [g["m"][0], g["m"][1], bmask(12)]), ValueError, r"masks\[2\]"),
    ("sq-mask-length", "masked_sq_norm", lambda g: (g["s"], g["m"][:1]), ValueError, r"masks"),
    ("sq-int", "masked_sq_norm", lambda g: ([s.long() for s in g["s"]],), TypeError, r"tensors\[0\]"),
    ("sq-mixed", "masked_sq_norm", lambda g: ([g["s"][0], g["s"][1].half(), g["s"][2]],), TypeError, r"tensors\[1\]"),
    # apply_masks_
    ("am-complex", "apply_masks_", lambda g: ([g["s"][0], g["s"][1].to(torch.complex64), g["s"][2]], g["m"]), TypeError,
     r"tensors\[1\]"),
    ("am-mask-shape", "apply_masks_", lambda g: (g["s"], [bmask(4, 3), g["m"][1], g["m"][2]]), ValueError, r"masks\[0\]"),
    ("am-mask-dtype", "apply_masks_", lambda g: (g["s"], [g["m"][0], g["m"][1], g["m"][2].float()]), TypeError, r"masks\[2\]"),
    ("am-length", "apply_masks_", lambda g: (g["s"], g["m"][:2]), ValueError, r"masks"),
    ("am-overlap", "apply_masks_", lambda g: (g["s"][:2] + [f32(2, 3, 1).expand(2, 3, 2)], g["m"]), ValueError,
     r"tensors\[2\].*memory"),
    ("am-not-list", "apply_masks_", lambda g: (g["s"], 5), TypeError, r"masks"),
    # mask_stats
    ("ms-dtype", "mask_stats", lambda g: ([g["m"][0], g["s"][1]],), TypeError, r"masks\[1\].*bool"),
    ("ms-single", "mask_stats", lambda g: (g["m"][0],), TypeError, r"masks must be a list"),
    ("ms-mapping", "mask_stats", lambda g: ({"w": g["m"][0]},), TypeError, r"masks.*mapping.*values\(\)"),
    ("ms-string", "mask_stats", lambda g: ("w",), TypeError, r"masks must be a list"),
]


@pytest.mark.parametrize("name,build,exc,match", [c[1:] for c in WRAPPER_CASES], ids=[c[0] for c in WRAPPER_CASES])
def test_wrapper_rejects(name, build, exc, match):
    call_and_check(getattr(W, name), build(good()), exc, match)


def test_apply_masks_to_grads_rejects():
    params = [torch.nn.Parameter(f32(3, 4)), torch.nn.Parameter(f32(5))]
    params[0].sum().backward()
    grad_before = params[0].grad.clone()
    with pytest.raises(ValueError, match=r"params\[0\]\.grad.*masks\[0\]"):
        W.apply_masks_to_grads_(params, [bmask(4, 3), bmask(5)])
    with pytest.raises(TypeError, match=r"masks\[0\].*bool"):
        W.apply_masks_to_grads_(params, [bmask(3, 4).float(), bmask(5)])
    with pytest.raises(ValueError, match=r"masks"):
        W.apply_masks_to_grads_(params, [bmask(3, 4)])
    assert torch.equal(params[0].grad, grad_before)


# Direct calls to torch.ops.widetopo.* with bad input: the compiled op must refuse before writing.
# The bad entry is the last tensor, so a kernel that writes tensor by tensor would be caught.
OP_CASES = [
    ("gt-length", "global_threshold", lambda g: (g["s"], g["m"][:2], 3)),
    ("gt-mask-dtype", "global_threshold", lambda g: (g["s"], g["m"][:2] + [g["m"][2].to(torch.uint8)], 3)),
    ("gt-mask-shape", "global_threshold", lambda g: (g["s"], g["m"][:2] + [bmask(3, 2, 2)], 3)),
    ("gt-int-scores", "global_threshold", lambda g: (g["s"][:2] + [g["s"][2].int()], g["m"], 3)),
    ("gt-mixed-dtype", "global_threshold", lambda g: (g["s"][:2] + [g["s"][2].double()], g["m"], 3)),
    ("gt-keep-neg", "global_threshold", lambda g: (g["s"], g["m"], -1)),
    ("gt-keep-big", "global_threshold", lambda g: (g["s"], g["m"], 30)),
    ("gt-mode", "global_threshold", lambda g: (g["s"], g["m"], 3, "approx")),
    ("gt-nan-last", "global_threshold", lambda g: (g["s"][:2] + [torch.full((2, 3, 2), math.nan)], g["m"], 3)),
    ("dd-exp-nan", "density_decay_", lambda g: (g["s"], g["m"], math.nan)),
    ("dd-mask-shape", "density_decay_", lambda g: (g["s"], g["m"][:2] + [bmask(2, 2, 3)], 1.0)),
    ("dd-mask-dtype", "density_decay_", lambda g: (g["s"], g["m"][:2] + [g["m"][2].float()], 1.0)),
    ("dd-length", "density_decay_", lambda g: (g["s"], g["m"][:2], 1.0)),
    ("dd-int", "density_decay_", lambda g: (g["s"][:2] + [g["s"][2].long()], g["m"], 1.0)),
    ("rs-length", "restoration_scores", lambda g: (g["m"], g["noise"][:2], 1e-5)),
    ("rs-noise-shape", "restoration_scores", lambda g: (g["m"], g["noise"][:2] + [torch.zeros(3, 2)], 1e-5)),
    ("rs-noise-dtype", "restoration_scores", lambda g: (g["m"], g["noise"][:2] + [torch.zeros(2, 3, dtype=torch.float64)], 1e-5)),
    ("rs-mask-dtype", "restoration_scores", lambda g: (g["m"][:2] + [g["m"][2].int()], g["noise"], 1e-5)),
    ("rs-scale", "restoration_scores", lambda g: (g["m"], g["noise"], math.inf)),
    ("ac-a-length", "accumulate_score_", lambda g: (g["s"], g["s"][:2], [], [], True)),
    ("ac-a-shape", "accumulate_score_", lambda g: (g["s"], g["s"][:2] + [f32(2, 6)], [], [], True)),
    ("ac-b-shape", "accumulate_score_", lambda g: (g["s"], g["s"], g["s"][:2] + [f32(2, 6)], [], True)),
    ("ac-mask-shape", "accumulate_score_", lambda g: (g["s"], g["s"], [], g["m"][:2] + [bmask(12)], True)),
    ("ac-mask-length", "accumulate_score_", lambda g: (g["s"], g["s"], [], g["m"][:2], True)),
    ("ac-int", "accumulate_score_", lambda g: (g["s"][:2] + [g["s"][2].long()], g["s"], [], [], True)),
    ("sq-mask-shape", "masked_sq_norm", lambda g: (g["s"], g["m"][:2] + [bmask(12)])),
    ("sq-int", "masked_sq_norm", lambda g: (g["s"][:2] + [g["s"][2].long()], [])),
    ("am-mask-shape", "apply_masks_", lambda g: (g["s"], g["m"][:2] + [bmask(12)])),
    ("am-mask-dtype", "apply_masks_", lambda g: (g["s"], g["m"][:2] + [g["m"][2].float()])),
    ("am-length", "apply_masks_", lambda g: (g["s"], g["m"][:2])),
    ("ms-dtype", "mask_stats", lambda g: (g["m"][:2] + [g["s"][2]],)),
    # In-place outputs with internally overlapping memory (expand()) as the last tensor: must be
    # refused before the earlier tensors are written.
    ("gt-overlap", "global_threshold", lambda g: (g["s"], g["m"][:2] + [bmask(1, 3, 2).expand(2, 3, 2)], 3)),
    ("dd-overlap", "density_decay_", lambda g: (g["s"][:2] + [f32(1, 3, 2).expand(2, 3, 2)], g["m"], 1.0)),
    ("ac-overlap", "accumulate_score_", lambda g: (g["s"][:2] + [f32(1, 3, 2).expand(2, 3, 2)], g["s"], [], [], True)),
    ("am-overlap", "apply_masks_", lambda g: (g["s"][:2] + [f32(1, 3, 2).expand(2, 3, 2)], g["m"])),
]


@pytest.mark.parametrize(
    "name,build",
    [pytest.param(*c[1:], id=c[0], marks=pytest.mark.needs_kernel(c[1])) for c in OP_CASES],
)
def test_compiled_op_rejects(name, build):
    call_and_check(getattr(OPS, name), build(good()), TORCH_ERRORS, r"widetopo|must|shape|dtype|keep|mode|finite|NaN|nan|overlap")


@pytest.mark.needs_kernel("global_threshold")
def test_failed_threshold_keeps_masks_and_partial_nan():
    # A NaN in the middle of a big tensor, after valid tensors: masks untouched, index named.
    s = [torch.randn(50), torch.randn(200, 300), torch.randn(7)]
    s[1][150, 17] = math.nan
    m = [torch.ones(50, dtype=torch.bool), torch.zeros(200, 300, dtype=torch.bool), torch.ones(7, dtype=torch.bool)]
    call_and_check(W.global_threshold, (s, m, 100), (RuntimeError, ValueError), r"scores\[1\]")


# ---- entries of one call that share memory (one GPU launch covers the whole list) ----------
def _alias_cases():
    s = torch.randn(4, 5)
    m = torch.rand(4, 5) < 0.5
    base = torch.randn(40)
    mb = torch.zeros(40, dtype=torch.bool)
    return [
        # (id, op, args, the argument the message must name)
        ("acc-same-score", "accumulate_score_", ([s, s], [torch.randn(4, 5), torch.randn(4, 5)], [], [], True), r"scores\[1\] shares memory with scores\[0\]"),
        ("acc-score-read-elsewhere", "accumulate_score_", ([s, torch.randn(4, 5)], [torch.randn(4, 5), s], [], [], True), r"a\[1\] shares memory with scores\[0\]"),
        ("acc-overlapping-slices", "accumulate_score_", ([base[:20], base[10:30]], [torch.randn(20), torch.randn(20)], [], [], True), r"scores\[1\] shares memory with scores\[0\]"),
        ("gt-same-mask", "global_threshold", ([torch.randn(4, 5), torch.randn(4, 5)], [m, m], 3, "exact"), r"masks\[1\] shares memory with masks\[0\]"),
        ("gt-mask-views", "global_threshold", ([torch.randn(20), torch.randn(4, 5)], [mb[:20], mb[15:35].view(4, 5)], 3, "exact"), r"masks\[1\] shares memory with masks\[0\]"),
        ("dd-same-score", "density_decay_", ([s, s], [m, m], 1.0), r"scores\[1\] shares memory with scores\[0\]"),
        ("am-same-tensor", "apply_masks_", ([s, s], [m, m]), r"tensors\[1\] shares memory with tensors\[0\]"),
        ("am-mask-written", "apply_masks_", ([mb[:20], torch.randn(20)], [torch.ones(20, dtype=torch.bool), mb[:20]]), r"masks\[1\] shares memory with tensors\[0\]"),
    ]


@pytest.mark.parametrize("case", _alias_cases(), ids=lambda c: c[0])
def test_cross_entry_aliasing_refused(case):
    _, op, args, match = case
    pytest.importorskip("widetopo_ext")
    if not W.build_info()["cpu_kernels"].get(op, False):
        pytest.skip(f"no CPU kernel for {op}")
    before = [t.clone() for a in args if isinstance(a, list) for t in a]
    for fn in (getattr(OPS, op), getattr(W, op)):
        with pytest.raises(RuntimeError, match=match):
            fn(*args)
    after = [t for a in args if isinstance(a, list) for t in a]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "a refused call wrote something"


@pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_")
def test_disjoint_views_and_same_entry_reuse_allowed():
    # Disjoint slices of one buffer and one tensor in two lists
    # of the same entry are fine (no element is written by one entry and touched by another).
    base = torch.zeros(40)
    a = [torch.ones(20), torch.full((20,), 2.0)]
    W.accumulate_score_([base[:20], base[20:]], a, absolute=False)
    assert base[:20].eq(1).all() and base[20:].eq(2).all()
    mb = torch.zeros(40, dtype=torch.bool)
    W.global_threshold([torch.arange(20.0), torch.arange(20.0) - 100], [mb[:20], mb[20:]], 10)
    assert mb[:20].sum() == 10 and not mb[20:].any() and mb[10:20].all()
    s = torch.randn(6)
    m = s > 0
    W.apply_masks_([s], [m])  # a tensor and its own mask: same entry
    W.accumulate_score_([s], [s], absolute=True)  # S += |S * 1|, elementwise in place
