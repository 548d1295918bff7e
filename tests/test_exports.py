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
