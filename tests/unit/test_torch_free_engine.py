"""The scheduler, its sequences and the block bookkeeping import no torch (``../shared/
ARCHITECTURE.md``: policy code works on ids and integers), nor do the engine loop's messages,
the stream registry and the client side of the transports (a process that only talks to an
engine process needs no torch). Each module is imported alone in a fresh interpreter, so one
that leans on another's imports shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# policy code and its bookkeeping: ids and integers
POLICY = ("cluster.engine.scheduler", "cluster.engine.sequence")
BOOKKEEPING = (
    "cache.block_manager",
    "cache.kv_policy",
    "cache.block_key",
    "cache.hash_ring",
    "cache.kv_store",
)
# the loop's messages, and what a caller of either transport holds
LOOP = ("cluster.engine.loop", "cluster.engine.streams", "cluster.engine.kv_events")
CALLER = ("cluster.engine.client", "cluster.engine.launch")
HEAVY = ("torch", "transformers", "safetensors", "experts.model", "experts.sampling")


@pytest.mark.parametrize("module", POLICY + BOOKKEEPING + LOOP + CALLER)
def test_imports_no_torch(module: str) -> None:
    probe = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    cmd = [sys.executable, "-c", probe]
    loaded = subprocess.check_output(cmd, cwd=REPO, text=True, timeout=120).split()
    assert not loaded, f"importing {module} loads {loaded}"
