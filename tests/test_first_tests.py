"""A newcomer's first tests: the README's and docs/testing.md's, pasted into a new project.

The project has no pytest configuration at all, so pytest-asyncio runs in its default strict
mode; pytest is run in a subprocess from the project's folder, as its author would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pytest in a subprocess, twice

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "docs" / "src"
PYTHON_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INCLUDE = re.compile(r'^--8<-- "([^":]+)(?::[^"]*)?"$', re.MULTILINE)


def run_pytest(project: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warnings summary" not in result.stdout, result.stdout
    return result.stdout


def test_the_readme_test_passes_in_a_new_project_in_strict_mode(tmp_path: Path) -> None:
    blocks = PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    app = next(block for block in blocks if "FastAPI(" in block)
    (test,) = (block for block in blocks if "def test_" in block)
    (tmp_path / "main.py").write_text(app)  # the README's test says: "the app above, in main.py"
    (tmp_path / "test_readme.py").write_text(test)
    assert "1 passed" in run_pytest(tmp_path)


def test_the_testing_guides_tests_pass_in_a_new_project_in_strict_mode(tmp_path: Path) -> None:
    # The guide shows an application (myapp/...) and its tests (docs/src/testing_*.py); the
    # project gets exactly the files the page includes, tests under the names pytest collects.
    included = set(INCLUDE.findall((ROOT / "docs" / "testing.md").read_text()))
    tests = sorted(name for name in included if name.startswith("testing_"))
    assert len(tests) >= 5, included
    (tmp_path / "tests").mkdir()
    for name in tests:
        shutil.copy(SRC / name, tmp_path / "tests" / name.replace("testing_", "test_"))
    (tmp_path / "myapp").mkdir()
    for name in included - set(tests):
        assert name.startswith("myapp/"), name
        shutil.copy(SRC / name, tmp_path / name)
    (tmp_path / "myapp" / "__init__.py").touch()
    collected = [
        line
        for name in tests
        for line in (SRC / name).read_text().splitlines()
        if re.match(r"(async )?def test_", line)
    ]
    assert f"{len(collected)} passed" in run_pytest(tmp_path)
