"""Importing the package stays light, and the pytest plugin is registered by entry point."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = (
    "fastapi",
    "starlette",
    "django",
    "litestar",
    "quart",
    "redis",
    "asyncpg",
    "psycopg",
    "psycopg2",
    "sqlalchemy",
    "sqlite3",
    "_sqlite3",
    "pydantic",
    "anyio",
    "freezegun",
    "time_machine",
    "pytest",
    "prometheus_client",
    "opentelemetry",
)


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    "statement",
    ["import repeat_every", "import repeat_every.testing", "import repeat_every.metrics"],
)
def test_import_loads_no_web_framework_database_or_test_tool(statement: str) -> None:
    modules = _modules_after(statement)
    loaded = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN)
    assert loaded == []


def test_only_importing_repeat_every_fastapi_imports_fastapi() -> None:
    assert "repeat_every.fastapi" not in _modules_after("import repeat_every")
    modules = _modules_after("import repeat_every.fastapi")
    assert {"fastapi", "pydantic"} <= modules


def test_pytest_plugin_is_registered_by_entry_point() -> None:
    (entry_point,) = [
        ep
        for ep in importlib.metadata.entry_points(group="pytest11")
        if ep.value.startswith("repeat_every")
    ]
    assert entry_point.name == "repeat_every"
    assert entry_point.value == "repeat_every.testing._plugin"
    assert hasattr(entry_point.load(), "fake_clock")


@pytest.mark.parametrize("mode", [None, "strict", "auto"], ids=["no-config", "strict", "auto"])
def test_fake_clock_fixture_is_available_to_a_project_that_only_installed_the_package(
    tmp_path: Path, mode: str | None
) -> None:
    # A user's project: no plugin configuration at all, or pytest-asyncio in a given mode; an
    # async test (marked, as strict mode requires) and a sync one use the fixture.
    # (With no configuration pytest-asyncio itself warns that its loop scope is unset.)
    config = (
        ""
        if mode is None
        else f"asyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    (tmp_path / "pytest.ini").write_text(f"[pytest]\n{config}")
    (tmp_path / "test_user.py").write_text(
        "import asyncio\n"
        "import pytest\n"
        "from repeat_every import repeat_every\n"
        "\n"
        "@repeat_every(seconds=60)\n"
        "async def job():\n"
        "    pass\n"
        "\n"
        "@pytest.mark.asyncio\n"
        "async def test_async(fake_clock):\n"
        "    handle = job()\n"
        "    await fake_clock.advance(180)\n"
        "    handle.cancel()\n"
        "    await handle.wait()\n"
        "    assert fake_clock.history.started(job) == [0.0, 60.0, 120.0, 180.0]\n"
        "\n"
        "def test_sync(fake_clock):\n"
        "    async def main():\n"
        "        handle = job()\n"
        "        await fake_clock.advance(60)\n"
        "        handle.cancel()\n"
        "    asyncio.run(main())\n"
        "    assert fake_clock.history.started(job) == [0.0, 60.0]\n"
    )
    _run_users_tests(tmp_path, expect="2 passed")


def _run_users_tests(project: Path, expect: str) -> None:
    """Run pytest in a user's project (its own pytest.ini), as the user would."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=project,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert expect in result.stdout
