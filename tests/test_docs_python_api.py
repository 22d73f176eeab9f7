"""docs/python-api.md runs: its ```python blocks, in order, in one namespace, in a scratch
directory holding a copy of actions/ (the page's paths are relative to the repository root).

An exception or a failed assert in any block fails the test and names the block."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

import latticeflow

pytest.importorskip("pyerrors")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
#: the page promises a run "well under a minute" on a CPU
BUDGET_S = 60.0


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def test_blocks_are_found() -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 10
    assert all(block.strip() for block in blocks)


def test_every_public_name_is_listed() -> None:
    text = DOC.read_text()
    missing = [name for name in latticeflow.__all__
               if name != "__version__" and f"lf.{name}" not in text]
    assert not missing, f"docs/python-api.md does not mention {missing}"


def test_the_page_runs(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "actions", tmp_path / "actions")
    namespace: dict[str, object] = {"__name__": "python_api_doc"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    start = time.perf_counter()
    try:
        for number, block in enumerate(python_blocks(DOC.read_text()), start=1):
            code = compile(block, f"docs/python-api.md block {number}", "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
    finally:
        os.chdir(cwd)
    elapsed = time.perf_counter() - start
    assert elapsed < BUDGET_S, f"the page took {elapsed:.0f} s"
