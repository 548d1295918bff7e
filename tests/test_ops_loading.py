"""Loading of widetopo_ext: the compiled extension, build_info, exported names, the error when the
extension is missing, and the fake (meta) implementations' output contracts."""
import importlib
import sys

import pytest
import torch

import widetopo_ext as W

OP_NAMES = list(W.OPS)  # the Python side's declaration; build_info() is the compiled library's


def test_build_info_forwards_extension():
    info = W.build_info()
    assert info == W._C.build_info()
    assert info["ops"] == OP_NAMES
    assert set(info["cpu_kernels"]) == set(OP_NAMES) and set(info["cuda_kernels"]) == set(OP_NAMES)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)


def test_exports_and_schemas():
    for name in OP_NAMES + ["apply_masks_to_grads_"]:
        assert callable(getattr(W, name)) and callable(getattr(W.reference, name))
    for name in OP_NAMES:
        schema = getattr(torch.ops.widetopo, name).default._schema
        assert schema.name == f"widetopo::{name}"
    assert str(torch.ops.widetopo.global_threshold.default._schema).startswith(
        "widetopo::global_threshold(Tensor[] scores, Tensor(a!)[] masks, int keep, str rule=\"exact\")")


def test_noise_scale_default_is_one_value_in_schema_wrapper_and_engine():
    """The C++ schema repeats widetopo_ext.DEFAULT_NOISE_SCALE; the paper's value is 1e-5."""
    from widetopo.engine.options import EngineOptions

    arg = torch.ops.widetopo.restoration_scores.default._schema.arguments[2]
    assert arg.name == "noise_scale" and arg.default_value == W.DEFAULT_NOISE_SCALE == 1e-5
    assert EngineOptions().noise_scale == W.DEFAULT_NOISE_SCALE


def test_missing_extension_error_says_how_to_build(monkeypatch):
    # Simulate an unbuilt checkout: `widetopo_ext._C` unimportable, the package imported afresh.
    # __init__ fails before registering anything, and monkeypatch restores the loaded modules.
    for name in [n for n in sys.modules if n == "widetopo_ext" or n.startswith("widetopo_ext.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "widetopo_ext._C", None)
    with pytest.raises(ImportError) as info:
        importlib.import_module("widetopo_ext")
    msg = str(info.value)
    assert "widetopo_ext._C" in msg
    assert "pip install --no-build-isolation ." in msg
    assert "python setup.py build_ext --inplace" in msg
    assert "pip install torch==" in msg
    assert "link" in msg  # says why: the extension must link the installed torch


def test_fake_impls_give_contract_outputs():
    meta = torch.device("meta")
    scores = [torch.empty(3, 4, device=meta, dtype=torch.bfloat16), torch.empty(5, device=meta, dtype=torch.bfloat16)]
    masks = [torch.empty(3, 4, device=meta, dtype=torch.bool), torch.empty(5, device=meta, dtype=torch.bool)]
    thr = torch.ops.widetopo.global_threshold(scores, masks, 3)
    assert thr.shape == () and thr.dtype == torch.float64 and thr.device == meta
    out = torch.ops.widetopo.restoration_scores(masks, [torch.empty(3, 4, device=meta), torch.empty(0, device=meta)])
    assert [o.shape for o in out] == [m.shape for m in masks] and all(o.dtype == torch.float32 for o in out)
    assert all(o.is_contiguous() for o in out)
    for dtype, expected in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        n = torch.ops.widetopo.masked_sq_norm([s.to(dtype) for s in scores], [])
        assert n.shape == () and n.dtype == expected
    st = torch.ops.widetopo.mask_stats(masks)
    assert st.shape == (2, 3) and st.dtype == torch.int64
    assert torch.ops.widetopo.density_decay_(scores, masks, 1.0) is None
    assert torch.ops.widetopo.apply_masks_(scores, masks) is None
    assert torch.ops.widetopo.accumulate_score_(scores, scores, [], [], True) is None


def test_reference_has_the_wrapper_signatures():
    import inspect

    for name in OP_NAMES + ["apply_masks_to_grads_"]:
        wrapper, ref = inspect.signature(getattr(W, name)), inspect.signature(getattr(W.reference, name))
        assert [(p.name, p.default) for p in wrapper.parameters.values()] == \
               [(p.name, p.default) for p in ref.parameters.values()], name
