"""The documentation's examples run: python blocks of the docs and the docstring examples."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every page: its python blocks run as written (in order, sharing one namespace per page). A page
# that only shows signatures or shell commands uses plain or ```bash fences.
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]

MODULES = [
    "argminlayers.layer",
    "argminlayers.check",
    "poolings.avg",
    "poolings.max",
    "poolings.approx_rank",
    "poolings.rank",
    "argminlayers.projections",
    "poolings.constrained",
]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    path = ROOT / page
    if not path.exists():
        pytest.fail(f"{page} is linked from the README but missing")
    blocks = python_blocks(path.read_text())
    if not blocks:
        pytest.skip(f"{page} has no python block")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page}, python block {i} failed: {exc!r}\n{block}") from exc


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
