"""The library never imports the command line: widetopo.cli sits on top of widetopo.experiments
and the rest, never the other way round."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "python" / "widetopo"


def _library_modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        if rel.parts[1] == "cli" or rel.name == "__main__":
            continue
        yield ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_no_library_source_names_the_cli():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if "cli" not in p.relative_to(ROOT).parts[:1] and p.name != "__main__.py"
                 and re.search(r"widetopo\.cli\b|from widetopo import cli\b", p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_importing_every_library_module_leaves_the_cli_unimported():
    modules = list(_library_modules())
    assert "widetopo.experiments.recipe" in modules and "widetopo.experiments.compare" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'widetopo.cli' or m.startswith('widetopo.cli.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
