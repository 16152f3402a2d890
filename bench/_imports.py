"""Scenario 5, import cost: what ``import repeat_every`` costs a service at start-up.

``python -X importtime -c "import repeat_every"`` is run ``repeats`` times in fresh
interpreters (after one warm-up run that writes the byte-code caches); the figure is the median
of the cumulative microseconds of the ``repeat_every`` line, i.e. everything the import pulled
in that the interpreter had not loaded at start. The same is measured for ``repeat_every.testing``
and for fastapi-utils' ``fastapi_utils.tasks`` (which imports Starlette). The top-level
packages loaded are listed, and checked against the ones that must stay out: FastAPI,
Starlette, Redis, SQLAlchemy, sqlite3, asyncpg and other database drivers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from _common import (
    FASTAPI_UTILS,
    OURS,
    Headline,
    Params,
    Result,
    Section,
    available,
    fmt,
    median,
    table,
)

FORBIDDEN = (
    "fastapi",
    "starlette",
    "redis",
    "sqlalchemy",
    "sqlite3",
    "_sqlite3",
    "asyncpg",
    "psycopg",
    "psycopg2",
    "aiosqlite",
    "pymysql",
)
ASYNCIO = "asyncio (reference)"
MODULES = {
    OURS: "repeat_every",
    "repeat-every testing": "repeat_every.testing",
    FASTAPI_UTILS: "fastapi_utils.tasks",
    ASYNCIO: "asyncio",
}
_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


def plan(quick: bool) -> list[Params]:
    """One child per module measured."""
    return [
        {"contender": c, "module": m, "repeats": 2 if quick else 15}
        for c, m in MODULES.items()
        if available(c)
    ]


def measure(params: Params) -> Result:
    """Median cumulative import time, and the top-level packages the import loaded."""
    module = params["module"]
    cumulative: list[int] = []
    for attempt in range(params["repeats"] + 1):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True,
            text=True,
            check=True,
        )
        lines = [m for m in map(_LINE.match, done.stderr.splitlines()) if m]
        target = [int(m.group(2)) for m in lines if m.group(4) == module]
        if attempt == 0:  # warm-up: byte-code caches written
            continue
        cumulative.append(target[-1] if target else 0)
    # What "python -c pass" already has loaded is not the import's doing.
    baseline = subprocess.run(
        [sys.executable, "-c", "import sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    at_start = {name.split(".")[0] for name in baseline}
    check = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    new = sorted({name.split(".")[0] for name in check} - at_start)
    stdlib = set(sys.stdlib_module_names)
    return {
        "us": median(cumulative),
        "each_us": cumulative,
        "stdlib": [name for name in new if name in stdlib and not name.startswith("_")],
        "stdlib_private": [name for name in new if name in stdlib and name.startswith("_")],
        "third_party": [
            name for name in new if name not in stdlib and not name.startswith("_sysconfigdata")
        ],
        "forbidden": sorted(set(new) & set(FORBIDDEN)),
    }


def report(results: list[tuple[Params, Result]], out: Path) -> Section:
    """Import times, the packages loaded, the forbidden ones found."""
    by = {p["contender"]: (p, r) for p, r in results}
    asyncio_us = by[ASYNCIO][1]["us"] if ASYNCIO in by else float("nan")
    rows = []
    for params, result in by.values():
        rows.append(
            [
                f"`import {params['module']}`",
                fmt(result["us"] / 1000),
                "—" if params["module"] == "asyncio" else fmt((result["us"] - asyncio_us) / 1000),
                ", ".join(result["forbidden"]) or "none",
                ", ".join(f"`{name}`" for name in result["third_party"]),
                str(len(result["stdlib"]) + len(result["stdlib_private"])),
            ]
        )
    repeats = results[0][0]["repeats"]
    body = [
        f"Median of {repeats} fresh interpreters (`python -X importtime`), after a warm-up "
        "run. *Beyond asyncio* subtracts `import asyncio`, which every asyncio service pays "
        "anyway. Packages are counted beyond what a bare interpreter has loaded at start.\n\n"
        + table(
            [
                "",
                "ms",
                "ms beyond asyncio",
                "forbidden packages loaded",
                "third-party packages",
                "stdlib modules",
            ],
            rows,
        )
    ]
    with_asyncio = set(by[ASYNCIO][1]["stdlib"]) if ASYNCIO in by else set()
    for params, result in by.values():
        if params["module"] == "asyncio":
            continue
        extra = [name for name in result["stdlib"] if name not in with_asyncio]
        body.append(
            f"Public standard-library packages `import {params['module']}` loads beyond "
            "`import asyncio`: " + ", ".join(f"`{name}`" for name in extra)
        )
    headline = []
    if OURS in by:
        ours = by[OURS][1]
        values = {OURS: fmt(ours["us"] / 1000)}
        if FASTAPI_UTILS in by:
            values[FASTAPI_UTILS] = fmt(by[FASTAPI_UTILS][1]["us"] / 1000)
        headline.append(
            Headline(
                "5 import",
                f"`import repeat_every`, ms ({fmt((ours['us'] - asyncio_us) / 1000)} beyond "
                "asyncio); forbidden packages loaded: " + (", ".join(ours["forbidden"]) or "none"),
                values,
                "—",
                "no FastAPI/Starlette/Redis/DB driver",
                not ours["forbidden"],
            )
        )
    return Section("5. Import cost", "\n\n".join(body), headline)
