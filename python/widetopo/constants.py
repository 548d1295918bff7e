"""Constants shared by several subpackages, each declared once here.

The other defaults live with what they configure: the engine's (rounds, restorations,
restore_steps, restore_rounds, noise_scale, ...) in widetopo.engine.options.EngineOptions, a
method's in its scorer's Options dataclass and its Schedule in widetopo.methods, the restoration
noise scale of the ops in widetopo_ext.DEFAULT_NOISE_SCALE, the op names in widetopo_ext.OPS.
"""

__all__ = ["IGNORE_INDEX", "TARGET_KEYS", "MODEL_LABELS_KEY"]

#: target value excluded from the loss: F.cross_entropy's default ignore_index (the pixels of the
#: segmentation sets whose sub-pixels disagree carry it, and the losses skip it)
IGNORE_INDEX = -100

#: keys of a dict batch that hold the targets (taken out of the model's inputs, used by the
#: loss); "labels" is also the keyword under which a Hugging Face model computes its own loss
TARGET_KEYS = ("labels", "targets", "target", "y")
#: the target key that is handed back to the model (model(**inputs, labels=y)) by the loss-based
#: methods, so that a model computing its own loss (every Hugging Face task head) uses it
MODEL_LABELS_KEY = "labels"
