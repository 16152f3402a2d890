"""Benchmarks of repeat-every against its alternatives, measured side by side in one run.

Usage (from the repository root)::

    python bench/run.py            # full run: the README figures (a few minutes)
    python bench/run.py --quick    # CI-sized smoke run (well under a minute)
    python bench/run.py --only accuracy,imports --out /tmp/bench
    python bench/run.py --only virtual,clock   # re-measure the clocks, keep the rest
    python bench/run.py --render               # redo RESULTS.md and plots, measure nothing

Every measurement runs in a fresh child process (one per scenario, contender and repeat), so
no scenario inherits another's tasks, threads, memory or warmed caches. The parent prints the
headline table and writes ``RESULTS.md`` and the PNG plots into ``--out`` (default: this
folder), with the raw measurements in ``results.json``: a run with ``--only`` replaces the
scenarios it measured there and renders ``RESULTS.md`` from all of them, so the other sections
stay (each section says when it was measured). The machines these run on are shared and
noisy: compare the ratios measured in the same run, not absolute times across runs. Nothing
here asserts on speed; a scenario whose child fails makes the command exit with status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import (
    BARE,
    FASTAPI_UTILS,
    FLOOR,
    LOOPTIME,
    LOOPTIME_FAST,
    NEEDS,
    OURS,
    TRIO,
    Params,
    Result,
    Section,
    available,
    table,
    verdict,
)

HERE = Path(__file__).resolve().parent
SCENARIOS = {
    "accuracy": "_accuracy",
    "overhead": "_overhead",
    "scale": "_scale",
    "virtual": "_virtual",
    "imports": "_imports",
    "clock": "_clock",
    "stores": "_stores",
}
COLUMNS = (OURS, BARE, FASTAPI_UTILS, LOOPTIME, LOOPTIME_FAST, TRIO, FLOOR)
RAW = "results.json"  # the raw measurements RESULTS.md is rendered from
VERSIONS = ("repeat-every", "fastapi-utils", "looptime", "trio", "anyio", "matplotlib")
CHILD_TIMEOUT = 900.0  # seconds: a hung child fails the run instead of hanging CI


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print the headline table, write RESULTS.md and plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test for CI")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and plots go")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {list(SCENARIOS)}"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help=f"measure nothing: render RESULTS.md and the plots from --out's {RAW}",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODULE", "PARAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)

    only = [] if args.render else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [name for name in only if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    mode = "quick" if args.quick else "full"
    stored = _load_raw(out / RAW, mode)
    if args.render and not stored:
        parser.error(f"nothing to render: no {mode}-mode {out / RAW}")
    failed_now = False
    for name in only:
        module = importlib.import_module(SCENARIOS[name])
        load_before, started = _loadavg(), time.perf_counter()
        results: list[tuple[Params, Result]] = []
        failures: list[str] = []
        for params in module.plan(args.quick):
            print(f"[{name}] {_describe(params)} …", file=sys.stderr, flush=True)
            child_began = time.perf_counter()
            try:
                results.append((params, _spawn(SCENARIOS[name], params)))
            except ChildFailed as error:
                failures.append(f"{name}: {_describe(params)}: {error}")
                print(f"[{name}] FAILED: {error}", file=sys.stderr, flush=True)
            print(
                f"[{name}]   {time.perf_counter() - child_began:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        failed_now = failed_now or bool(failures)
        stored[name] = {
            "date": _now(),
            "load": f"{load_before} → {_loadavg()}",
            "duration_s": round(time.perf_counter() - started, 1),
            "results": results,
            "failures": failures,
        }
    elapsed = time.perf_counter() - began

    (out / RAW).write_text(_dump_raw(mode, stored), encoding="utf-8")
    sections, broken = _render(stored, out)
    failures = [f for record in stored.values() for f in record["failures"]] + broken
    text = _results_md(sections, failures, stored, only, args, elapsed)
    (out / "RESULTS.md").write_text(text, encoding="utf-8")
    print(_headline_table(sections))
    print(f"\nwrote {out / 'RESULTS.md'} in {elapsed:.0f} s", file=sys.stderr)
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failed_now or broken else 0


def _render(stored: dict[str, Any], out: Path) -> tuple[list[Section], list[str]]:
    """Every stored scenario's section (in the usual order), and the reports that failed."""
    sections: list[Section] = []
    failures: list[str] = []
    for name in SCENARIOS:
        if name not in stored:
            continue
        record = stored[name]
        results = [(params, result) for params, result in record["results"]]
        if not results:
            continue
        module = importlib.import_module(SCENARIOS[name])
        try:
            section = module.report(results, out)
        except Exception as error:  # a missing row, say: report it, keep the other scenarios
            failures.append(f"{name}: report: {error!r}")
            continue
        section.body = (
            f"*Measured {record['date']}, load average {record['load']}, "
            f"{record['duration_s']:g} s.*\n\n" + section.body
        )
        sections.append(section)
    return sections, failures


def _load_raw(path: Path, mode: str) -> dict[str, Any]:
    """The scenarios stored by earlier runs in the same mode (none if absent or unreadable)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("mode") != mode:
        return {}
    scenarios = raw.get("scenarios", {})
    return {name: scenarios[name] for name in SCENARIOS if name in scenarios}


def _dump_raw(mode: str, stored: dict[str, Any]) -> str:
    """JSON of the raw measurements, floats cut to 6 significant digits to keep it small."""

    def short(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.6g}")
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [short(v) for v in value]
        return value

    return json.dumps({"mode": mode, "scenarios": short(stored)}, ensure_ascii=False) + "\n"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class ChildFailed(Exception):
    """A measurement's child process exited with an error or printed no result."""


def _spawn(module: str, params: Params) -> Result:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", module, json.dumps(params)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"no result within {CHILD_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise ChildFailed(f"exit status {done.returncode}\n{done.stderr.strip()}")
    try:
        result: Result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ChildFailed(f"no JSON result on stdout\n{done.stderr.strip()}") from None
    return result


def _child(module_name: str, params_json: str) -> int:
    module: ModuleType = importlib.import_module(module_name)
    result = module.measure(json.loads(params_json))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


def _describe(params: Params) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def _versions() -> str:
    found = []
    for dist in VERSIONS:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return ", ".join(found)


def _missing() -> list[str]:
    return [contender for contender in NEEDS if not available(contender)]


def _headline_table(sections: list[Section]) -> str:
    rows = [h for s in sections for h in s.headline]
    used = [c for c in COLUMNS if any(c in h.values for h in rows)]
    header = ["scenario", "measure", *used, "ratio", "target", "result"]
    body = [
        [
            h.scenario,
            h.measure,
            *(h.values.get(c, "—") for c in used),
            h.ratio,
            h.target,
            h.flag or verdict(h.met),
        ]
        for h in rows
    ]
    return table(header, body)


def _results_md(
    sections: list[Section],
    failures: list[str],
    stored: dict[str, Any],
    only: list[str],
    args: Any,
    elapsed: float,
) -> str:
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    if args.render:
        command += " --render"
    elif args.only != ",".join(SCENARIOS):
        command += f" --only {args.only}"
    kept = [name for name in SCENARIOS if name in stored and name not in only]
    measured = table(
        ["scenario", "measured (finished)", "load average before → after", "duration"],
        [
            [
                name + ("" if name in only or args.render else " (kept from an earlier run)"),
                stored[name]["date"],
                stored[name]["load"],
                f"{stored[name]['duration_s']:g} s",
            ]
            for name in SCENARIOS
            if name in stored
        ],
    )
    parts = [
        "# Benchmark results",
        f"Generated by `{command}` (do not edit by hand; see `bench/README.md`)"
        + (
            f"; rendered from `{RAW}`, each section as measured at the date it gives."
            if args.render
            else f"; the sections {', '.join(kept)} come from an earlier run, kept in `{RAW}`."
            if kept
            else "."
        ),
        table(
            ["", ""],
            [
                ["date", _now()],
                ["mode", "quick (smoke sizes)" if args.quick else "full"],
                ["python", f"{platform.python_implementation()} {platform.python_version()}"],
                ["machine", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"],
                ["versions", _versions()],
                ["skipped (not installed)", ", ".join(_missing()) or "none"],
                [
                    "duration of this run",
                    "— (rendered only)" if args.render else f"{elapsed:.0f} s",
                ],
            ],
        ),
        measured,
        "The machine is shared and noisy: read the **ratios**, measured side by side in this "
        "run; absolute figures move from run to run.",
        "## Headline",
        _headline_table(sections),
    ]
    if failures:
        parts.append("## Failures\n\n" + "\n".join(f"- `{f}`" for f in failures))
    for section in sections:
        parts.append(f"## {section.title}\n\n{section.body}")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
