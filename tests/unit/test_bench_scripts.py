"""Every bench script loads as ``python bench/NAME.py`` does: from another folder, with the
repo root not on the path (``bench`` is not an installed package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_scripts_import_from_anywhere(tmp_path: Path) -> None:
    scripts = sorted(str(p) for p in BENCH.glob("*.py"))
    assert len(scripts) >= 6
    # one process for all: torch, ray and transformers load once
    code = "import runpy, sys\nfor path in sys.argv[1:]:\n    runpy.run_path(path)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *scripts],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
