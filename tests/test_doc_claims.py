"""The numbers the README and docs state about `widetopo run` are what a fresh run prints (#18):
the accuracies are parsed from the text and compared with the command's own output."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLAIM = re.compile(r"pruned (0\.\d{3}), dense (0\.\d{3})")


def _claims():
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(path.read_text(encoding="utf-8").split())  # claims may wrap across lines
        found += [(path.name, float(p), float(d)) for p, d in CLAIM.findall(text)]
    return found


def test_every_doc_states_the_same_run_result():
    claims = _claims()
    assert any(name == "README.md" for name, _, _ in claims), "README.md states no `widetopo run` result"
    assert len({(p, d) for _, p, d in claims}) == 1, claims


def test_widetopo_run_prints_what_the_docs_say(capsys):
    pytest.importorskip("sklearn", reason="the default job uses scikit-learn's digits (pip install scikit-learn)")
    from widetopo.cli import main

    _, pruned, dense = _claims()[0]
    assert main(["run", "--threads", "1"]) == 0  # the result is the same with any thread count
    out = capsys.readouterr().out
    got = {k: float(v) for k, v in re.findall(r"^(pruned|dense)\s+[\d.]+\s+(0\.\d+)\s*$", out, re.M)}
    assert set(got) == {"pruned", "dense"}, out
    assert (round(got["pruned"], 3), round(got["dense"], 3)) == (pruned, dense), out
