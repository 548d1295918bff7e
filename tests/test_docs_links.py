"""The documentation's references resolve: relative links and their #anchors (README.md and
docs/*.md), "docs/design.md §N" references anywhere in the sources, and the module paths and
repository files the docs name in backticks.

Anchors follow GitHub's rule, written out here independently of any markdown library: the
heading's text without markup, lower-cased, every character that is not a letter, digit,
underscore, hyphen or space dropped, spaces turned into hyphens, and "-1", "-2", ... appended to
repeated slugs.
"""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SOURCE_DIRS = ("python", "widetopo_ext", "csrc", "benchmarks", "tests", "docs")
REPO_PREFIXES = ("benchmarks/", "tests/", "csrc/", "docs/", "python/", ".ci/", "widetopo/", "widetopo_ext/")

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")
CODE = re.compile(r"`[^`]*`")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            yield number, line


def slug(heading):
    text = LINK.sub(r"\1", heading)            # [text](url) -> text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)       # \w: unicode letters, digits, underscore
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_rule_on_hand_worked_headings():
    assert slug("2.4 Conventions of this implementation") == "24-conventions-of-this-implementation"
    assert slug("7. Op contracts (`widetopo_ext`)") == "7-op-contracts-widetopo_ext"
    assert slug("`widetopo report`: what the reports measure") == "widetopo-report-what-the-reports-measure"
    assert slug("Sharded scores (`shard_scores=True`)") == "sharded-scores-shard_scorestrue"


def links():
    for doc in DOCS:
        for number, line in prose_lines(doc.read_text(encoding="utf-8")):
            for m in LINK.finditer(CODE.sub("", line)):
                target = m.group(2)
                if re.match(r"^[a-z]+:", target):    # http:, https:, mailto:
                    continue
                yield pytest.param(doc, number, target, id=f"{doc.relative_to(ROOT)}:{number}:{target}")


@pytest.mark.parametrize("doc, number, target", list(links()))
def test_relative_link_resolves(doc, number, target):
    path, _, anchor = target.partition("#")
    dest = (doc.parent / path).resolve() if path else doc
    assert dest.exists(), f"{doc.relative_to(ROOT)}:{number}: {target} -> no file {dest}"
    if anchor:
        assert dest.suffix == ".md", f"{doc.relative_to(ROOT)}:{number}: anchor into a non-markdown file"
        assert anchor in anchors(dest), (
            f"{doc.relative_to(ROOT)}:{number}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def design_sections():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_design_section_references_exist():
    sections = design_sections()
    assert {"2", "2.1", "2.3", "3", "5", "5.6", "6", "7"} <= sections
    bad = []
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in {".py", ".md", ".h", ".cpp", ".cu", ".sh"} or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for m in re.finditer(r"design\.md[ ,]*§ ?(\d+(?:\.\d+)?)", text):
                if m.group(1) not in sections:
                    bad.append(f"{path.relative_to(ROOT)}: §{m.group(1)}")
    assert not bad, "references to sections docs/design.md does not have: " + ", ".join(bad)


def backticked(pattern):
    for doc in DOCS:
        for number, line in prose_lines(doc.read_text(encoding="utf-8")):
            for code in CODE.findall(line):
                m = re.fullmatch(pattern, code.strip("`").split("(")[0])
                if m:
                    yield pytest.param(doc, number, m.group(0), id=f"{doc.relative_to(ROOT)}:{number}:{m.group(0)}")


@pytest.mark.parametrize("doc, number, name", list(backticked(r"widetopo(_ext)?(\.[A-Za-z_]\w*)+")))
def test_named_module_or_attribute_exists(doc, number, name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"{doc.relative_to(ROOT)}:{number}: `{name}`: no {attr!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{doc.relative_to(ROOT)}:{number}: `{name}` names no importable module")


@pytest.mark.parametrize("doc, number, name", list(backticked(
    r"(?:%s)[\w./*-]*(?:::\w+)?" % "|".join(re.escape(p) for p in REPO_PREFIXES))))
def test_named_repository_path_exists(doc, number, name):
    path, _, function = name.partition("::")
    base = ROOT / "python" if path.startswith("widetopo/") else ROOT
    found = sorted(base.glob(path)) if "*" in path else [base / path] if (base / path).exists() else []
    assert found, f"{doc.relative_to(ROOT)}:{number}: `{name}` does not exist"
    if function:
        assert re.search(rf"^def {function}\(", found[0].read_text(encoding="utf-8"), re.M), (
            f"{doc.relative_to(ROOT)}:{number}: no function {function} in {path}")
