"""`import widetopo` exports its public names lazily; every advertised name must resolve."""
import importlib
import subprocess
import sys

import pytest


def test_every_public_name_resolves():
    import widetopo

    missing = []
    for name in widetopo.__all__:
        try:
            getattr(widetopo, name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, missing


def test_unknown_name_is_an_attribute_error():
    widetopo = importlib.import_module("widetopo")
    with pytest.raises(AttributeError, match="no attribute 'prnue'"):
        widetopo.prnue


def test_import_is_lazy():
    # Importing the package alone loads none of the engine modules.
    code = "import sys, widetopo; print(sorted(m for m in sys.modules if m.startswith('widetopo.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _error_classes():
    import inspect

    import widetopo.errors

    return [c for _, c in inspect.getmembers(widetopo.errors, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__ == "widetopo.errors"]


def test_every_error_class_is_exported_and_is_a_widetopo_error():
    import widetopo

    classes = _error_classes()
    assert len(classes) >= 9
    for cls in classes:
        assert getattr(widetopo, cls.__name__) is cls and cls.__name__ in widetopo.__all__
        assert issubclass(cls, widetopo.WidetopoError)


@pytest.mark.parametrize("module, name, builtin", [
    ("widetopo.engine.rounds", "NonFiniteScoresError", RuntimeError),
    ("widetopo.engine.rounds", "ZeroScoresError", RuntimeError),
    ("widetopo.engine.rounds", "NoiseScoresError", RuntimeError),
    ("widetopo.scores.differentiable", "DoubleBackwardError", RuntimeError),
    ("widetopo.engine.checkpoint", "CheckpointMismatch", ValueError),
    ("widetopo.sparsity.maskfile", "MaskFileError", ValueError),
    ("widetopo.sparsity.maskfile", "MaskMismatchError", ValueError),
    ("widetopo.data", "DatasetNotFoundError", FileNotFoundError),
    ("widetopo.experiments.pretrained", "InitMismatchError", ValueError),
])
def test_error_classes_keep_their_old_module_and_builtin_base(module, name, builtin):
    import widetopo.errors

    cls = getattr(widetopo.errors, name)
    assert getattr(importlib.import_module(module), name) is cls
    assert issubclass(cls, builtin)  # `except ValueError:` code written before WidetopoError still works
