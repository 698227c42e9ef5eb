"""Bad checkpoints fail at load with a message that names the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts.model import MoEModel
from experts.spec import FAMILIES, CheckpointError
from tests.checkpoints import BuildCheckpoint

EXPERT_TENSOR = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture(scope="module")
def good(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=1)


@pytest.fixture
def bad(good: Path, tmp_path: Path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(good, tmp_path / "bad"))


def _edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, drop: str | None = None, **replace: torch.Tensor) -> None:
    tensors = load_file(path / "model.safetensors")
    if drop:
        del tensors[drop]
    tensors.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        MoEModel.from_checkpoint(path)
    return str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nowhere")


def test_missing_config(bad: Path) -> None:
    (bad / "config.json").unlink()
    assert "config.json is missing" in _load_error(bad)


def test_config_not_json(bad: Path) -> None:
    (bad / "config.json").write_text("{not json")
    assert "not valid JSON" in _load_error(bad)


def test_missing_weights_file(bad: Path) -> None:
    (bad / "model.safetensors").unlink()
    assert "no weights" in _load_error(bad)


def test_index_names_missing_shard(bad: Path) -> None:
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors is listed" in _load_error(bad)


def test_missing_tensor_is_named(bad: Path) -> None:
    _edit_tensors(bad, drop=EXPERT_TENSOR)
    message = _load_error(bad)
    assert EXPERT_TENSOR in message and "missing" in message


def test_wrong_shape_gives_expected_and_found(bad: Path) -> None:
    cfg = json.loads((bad / "config.json").read_text())
    _edit_config(bad, intermediate_size=cfg["intermediate_size"] + 8)
    message = _load_error(bad)
    assert "has shape" in message and "expected" in message
    assert str(cfg["intermediate_size"] + 8) in message


def test_unsupported_architecture_lists_supported(bad: Path) -> None:
    _edit_config(bad, architectures=["GPT2LMHeadModel"])
    message = _load_error(bad)
    assert "GPT2LMHeadModel" in message
    assert all(arch in message for arch in FAMILIES)


def test_unsupported_config_dtype(bad: Path) -> None:
    _edit_config(bad, dtype="float64")
    assert "dtype 'float64'" in _load_error(bad)


def test_unsupported_tensor_dtype(bad: Path) -> None:
    _edit_tensors(bad, model__norm__weight=torch.ones(64, dtype=torch.int32))
    message = _load_error(bad)
    assert "model.norm.weight" in message and "I32" in message


def test_missing_required_config_field(bad: Path) -> None:
    _edit_config(bad, hidden_size=None)
    assert "'hidden_size'" in _load_error(bad)


def test_sliding_window_is_refused(bad: Path) -> None:
    _edit_config(bad, sliding_window=128)
    assert "sliding_window=128" in _load_error(bad)
