"""The documentation site builds (strictly), and its API reference reads as intended."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPHINX_ROLE = re.compile(r":(class|meth|func|attr|exc|mod|obj|data):")


@pytest.mark.slow
def test_the_site_builds_with_cross_references_and_no_internals_in_the_reference(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr

    pages = {p.relative_to(site).as_posix(): p.read_text() for p in site.rglob("*.html")}
    raw_roles = {name: SPHINX_ROLE.findall(page) for name, page in pages.items()}
    assert {name: roles for name, roles in raw_roles.items() if roles} == {}

    reference = pages["reference/index.html"]
    text = html.unescape(re.sub(r"<[^>]+>", "", reference))
    for internal in ("Timebase", "TaskOptions", "Schedule", "timebase"):
        assert internal not in text
    # Docstrings' cross-references became links, e.g. TaskHandle's to its own stop().
    assert 'href="#repeat_every.TaskHandle.stop"' in reference
    assert 'href="#repeat_every.testing.FakeClock.advance"' in reference
