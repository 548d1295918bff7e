"""widetopo: foresight pruning (pruning at initialization) with WideTopo and the methods it is
compared with, on a compiled C++/CUDA op library (`widetopo_ext`).

    import widetopo
    masks = widetopo.prune(model, loader, density=0.05, method="widetopo-s")
    widetopo.apply_masks(model, masks)        # torch.nn.utils.prune convention

Public names are imported lazily, so `import widetopo` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "prune": "widetopo.api",
    "saliency": "widetopo.api",
    "get_method": "widetopo.methods",
    "all_methods": "widetopo.methods",
    "Pruner": "widetopo.engine.pruner",
    "Masks": "widetopo.sparsity.masks",
    "LayerStats": "widetopo.sparsity.masks",
    "select_prunable": "widetopo.sparsity.selection",
    "register_in_out_layer": "widetopo.sparsity.selection",
    "collapsed_parts": "widetopo.sparsity.blocks",
    "density_schedule": "widetopo.engine.schedule",
    "restore_masks": "widetopo.engine.restoration",
    "Scorer": "widetopo.scores",
    "ScoreContext": "widetopo.scores",
    "WideTopoScorer": "widetopo.scores",
    "SNIPScorer": "widetopo.scores",
    "SynFlowScorer": "widetopo.scores",
    "MagnitudeScorer": "widetopo.scores",
    "RandomScorer": "widetopo.scores",
    "ntk_score": "widetopo.scores",
    "ita_score": "widetopo.scores",
    "apply_masks": "widetopo.sparsity.apply",
    "remove_masks": "widetopo.sparsity.apply",
    "MaskEnforcer": "widetopo.sparsity.apply",
    "save_masks": "widetopo.sparsity.maskfile",
    "load_masks": "widetopo.sparsity.maskfile",
    "build_model": "widetopo.models",
    "load_dataset": "widetopo.data",
    "mask_report": "widetopo.sparsity.report",
    "effective_sparsity": "widetopo.sparsity.effective",
    "register_method": "widetopo.methods",
    "unregister_method": "widetopo.methods",
    "Method": "widetopo.methods",
    "Schedule": "widetopo.methods",
    "ntk_spectrum": "widetopo.sparsity.spectrum",
    "ntk_matrix": "widetopo.sparsity.spectrum",
}
# every exception class a user may catch (widetopo.errors; all derive from WidetopoError)
_EXPORTS.update(dict.fromkeys((
    "WidetopoError", "NonFiniteScoresError", "ZeroScoresError", "NoiseScoresError", "DoubleBackwardError",
    "CheckpointMismatch",
    "MaskFileError", "MaskMismatchError", "DatasetNotFoundError", "InitMismatchError", "RecipeError",
    "CompareError", "RankMismatchError", "UnsupportedInputsError",
    "OutputLockedError"), "widetopo.errors"))

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'widetopo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
