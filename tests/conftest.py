"""Fixtures every test layer shares: small generated checkpoints, each built once per session.

Building a checkpoint runs transformers' ``save_pretrained`` (about a second each), so modules
that want the same family and seed share one directory instead of writing their own. The
directories are read-only by convention: a test that edits weights or files copies one first
(``shutil.copytree``), as ``test_checkpoint_errors`` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import FAMILIES, BuildCheckpoint, build_family_checkpoint


@pytest.fixture(scope="session")
def shared_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> BuildCheckpoint:
    """``shared_checkpoint("mixtral", seed=4)``: that family's seeded checkpoint, built on first
    use and then handed to every module asking for the same (family, seed)."""
    built: dict[tuple[str, int], Path] = {}

    def build(family: str = "mixtral", *, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{family}-seed{seed}") / "m"
            built[key] = build_family_checkpoint(family, out, seed=seed)
        return built[key]

    return build


@pytest.fixture(scope="session")
def family_checkpoints(shared_checkpoint: BuildCheckpoint) -> dict[str, Path]:
    """One checkpoint per supported family (seed 7), for the modules that compare families."""
    return {family: shared_checkpoint(family, seed=7) for family in FAMILIES}
