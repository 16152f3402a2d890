"""Types survive decoration: a user's module type-checks clean under mypy --strict and pyright,
and the mistakes a type checker should catch are caught (files in tests/typing/)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "typing"
OK = HERE / "user_ok.py"
MISTAKES = HERE / "user_mistakes.py"
ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.slow

Checker = Callable[[Path], set[int]]


def _expected_lines(path: Path) -> set[int]:
    lines = path.read_text().splitlines()
    return {n for n, line in enumerate(lines, start=1) if "# expect-error" in line}


def _mypy(path: Path) -> set[int]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    where = re.escape(str(path.relative_to(ROOT)))
    found = re.findall(rf"^{where}:(\d+): error:", result.stdout, re.M)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return {int(n) for n in found}


def _pyright(path: Path) -> set[int]:
    pyright = shutil.which("pyright", path=str(Path(sys.executable).parent))
    if pyright is None:
        pytest.skip("pyright is not installed (it is in the 'test' extra)")
    result = subprocess.run(
        [pyright, "--outputjson", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    report = json.loads(result.stdout)
    return {
        d["range"]["start"]["line"] + 1
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    }


@pytest.mark.parametrize("checker", [_mypy, _pyright], ids=["mypy", "pyright"])
def test_a_users_module_type_checks_clean(checker: Checker) -> None:
    assert checker(OK) == set()


@pytest.mark.parametrize("checker", [_mypy, _pyright], ids=["mypy", "pyright"])
def test_bare_decorator_and_wrong_return_types_are_type_errors(checker: Checker) -> None:
    expected = _expected_lines(MISTAKES)
    assert len(expected) == 5
    assert checker(MISTAKES) == expected
