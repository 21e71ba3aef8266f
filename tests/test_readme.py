"""The README's promises that a test can keep: its Layout block lists exactly the tree's modules, every relative
link of the README and of docs/ resolves, and it stays a short page (at most 300 lines)."""
import glob
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def layout_entries() -> list:
    """The first word of each line of the README's Layout block (a fenced block under ``## Layout``); an
    indented line continues the one above."""
    section = read("README.md").split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines()[1:] if line.strip() and not line[0].isspace()]


def expand(entry: str) -> set:
    """``kd_ref/presets_{seg,cls}.py`` and ``kd_ref/bench_*.py`` name several files; ``tests/`` a folder."""
    braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", entry)
    names = [braces[1] + part + braces[3] for part in braces[2].split(",")] if braces else [entry]
    return {os.path.normpath(path) for name in names for path in glob.glob(os.path.join(ROOT, name))}


def test_layout_lists_every_module_and_only_existing_ones():
    listed = set()
    for entry in layout_entries():
        paths = expand(entry)
        assert paths, f"README Layout lists {entry}, which does not exist"
        listed |= paths
    modules = {os.path.normpath(path) for path in glob.glob(os.path.join(ROOT, "kd_ref", "*.py"))
               if os.path.basename(path) != "__init__.py"}
    top_level = {os.path.normpath(os.path.join(ROOT, name)) for name in ("train.py", "evaluate.py")}
    missing = sorted(os.path.relpath(path, ROOT) for path in (modules | top_level) - listed)
    assert not missing, f"README Layout does not list {missing}"


def test_every_relative_link_resolves():
    documents = ["README.md"] + [os.path.relpath(path, ROOT)
                                 for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
    assert len(documents) > 1
    broken = []
    for document in documents:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", read(document), flags=re.S))  # code is not links
        for target in LINK.findall(prose):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(document), target)):
                broken.append((document, target))
    assert not broken, broken


def test_readme_is_at_most_300_lines():
    assert len(read("README.md").splitlines()) <= 300
