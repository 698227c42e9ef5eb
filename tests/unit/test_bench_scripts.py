"""Benches load as ``python -m bench.NAME`` loads them (from the repository root), and their
committed results hold targets and no absolute machine paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def test_bench_modules_import_from_the_repo_root() -> None:
    names = sorted(f"bench.{p.stem}" for p in BENCH.glob("*.py") if p.stem != "__init__")
    assert len(names) >= 6
    # one process for all: torch, ray and transformers load once
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.mark.parametrize("path", sorted((BENCH / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_results_have_targets_and_no_absolute_paths(path: Path) -> None:
    result = json.loads(path.read_text())
    assert isinstance(result.get("targets"), dict), f"{path.name}: no targets object"
    for name, entry in result["targets"].items():
        assert {"value", "goal", "met"} <= set(entry), f"{path.name}: target {name} is {entry}"
    absolute = [s for s in _strings(result) if s.startswith(("/", "~")) or "/work/" in s]
    assert not absolute, f"{path.name} names machine paths: {absolute[:3]}"


def test_the_results_writer_keeps_paths_relative(tmp_path: Path) -> None:
    from bench import harness

    args = harness.parser("probe", None).parse_args(["--out", str(tmp_path / "probe.json")])
    report = {"model": str(REPO / ".demo-models" / "tiny"), "nan": float("nan")}
    targets = {"x": harness.target(1.5, 1.0, at_least=True)}
    harness.write_results(args, report, targets)
    harness.write_results(args, report, {"x": harness.target(0.5, 1.0, at_least=True)})
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written["model"] == ".demo-models/tiny" and written["nan"] is None
    assert written["targets"]["x"]["met"] is False
    assert written["history"][0]["targets"] == {"x": 1.5}


def test_one_percentile_interpolates() -> None:
    from bench.harness import percentile, percentiles

    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentiles([], (50,)) == {"p50": None}
