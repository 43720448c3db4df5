"""The documentation stays true: its links resolve inside the repository, the configuration
page is the one the code makes, and docstrings hold no sweep tables (measurements live in docs/)."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A measured figure: a number with a unit of time, rate, size or ratio.
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|us|µs|ns|s|tokens/s|TB/s|GB/s|TFLOP/s|x|%|GB|MB|GiB|MiB)"
                    r"(?![\w/])")


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_the_readme_is_short_and_points_only_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "../shared" not in readme


def test_the_configuration_page_is_what_the_code_makes():
    from server.__main__ import configuration_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == configuration_markdown(), \
        "run: python -m server --configuration-markdown > docs/configuration.md"


def text_blocks(path: Path):
    """(line, text) of each docstring and each run of comment lines in a module."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "lineno", 1), doc
    run, start, last = [], 0, -2
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            if token.start[0] != last + 1 and run:
                yield start, "\n".join(run)
                run = []
            if not run:
                start = token.start[0]
            run.append(token.string)
            last = token.start[0]
    if run:
        yield start, "\n".join(run)


def test_no_docstring_or_comment_holds_more_than_one_measured_figure():
    crowded = [f"{path.relative_to(ROOT)}:{line}: {FIGURE.findall(text)}"
               for path in sorted((ROOT / "server").rglob("*.py")) for line, text in text_blocks(path)
               if len(FIGURE.findall(text)) > 1]
    assert crowded == [], "move the sweep to docs/ and keep the one figure that is the reason for a choice"
