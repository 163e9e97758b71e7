"""The docs say what the code and the benchmark results say: generated tables are current, links
resolve, and the README stays a manual."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_generated_tables_match_the_benchmark_results() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_relative_link_resolves() -> None:
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_the_readme_is_a_manual_of_at_most_250_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in [*(ROOT / "onnxbits").rglob("*.py"),
                                                  *(ROOT / "cli").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
