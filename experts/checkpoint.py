"""Reading Hugging Face checkpoint directories, one tensor at a time.

A ``CheckpointReader`` knows which file holds each tensor (from
``model.safetensors.index.json`` or the headers of the files) but reads no
tensor data until asked. Expert shards use it to load only their own
(layer, expert) weights, and from fused [E, ...] expert tensors only their slices
(``load_slice``); ``tensors_read`` records what was actually read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from experts.errors import CheckpointError
from experts.spec import SUPPORTED_DTYPES, ModelSpec

_DTYPES = {name: getattr(torch, name) for name in SUPPORTED_DTYPES}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointReader:
    """Lazy access to the tensors of one checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {str(self.path)!r} does not exist")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{config_path} is missing: a checkpoint directory needs config.json "
                "(build one with `moe-cluster demo-model --out DIR`)"
            )
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
        self.spec = ModelSpec.from_hf_config(self.config)
        self._files = self._index_files()
        self.tensors_read: list[str] = []

    def _index_files(self) -> dict[str, Path]:
        """Map every tensor name to the file holding it, reading headers only."""
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for fpath in sorted(set(files.values())):
                if not fpath.is_file():
                    raise CheckpointError(
                        f"{fpath.name} is listed in {index_path.name} but missing from {self.path}"
                    )
            return files
        single = self.path / "model.safetensors"
        candidates = [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))
        if not candidates:
            raise CheckpointError(
                f"no weights in {self.path}: expected model.safetensors, or *.safetensors "
                "with model.safetensors.index.json"
            )
        files = {}
        for fpath in candidates:
            with safe_open(str(fpath), framework="pt") as handle:
                for name in handle.keys():
                    files[name] = fpath
        return files

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def load(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Read one tensor, checking it is present, of ``shape`` and of a supported dtype."""
        with self._open(name, shape) as (handle, _):
            tensor = handle.get_tensor(name)
        self.tensors_read.append(name)
        return tensor.to(device=device, dtype=dtype or _DTYPES[self.spec.dtype])

    def load_slice(
        self,
        name: str,
        index: int,
        shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Row ``index`` of the tensor ``name`` of ``shape`` (e.g. one expert of [E, ...]),
        reading only that row's bytes; logged in ``tensors_read`` as ``name[index]``."""
        if not 0 <= index < shape[0]:
            raise CheckpointError(f"index {index} of {name!r} is outside [0, {shape[0]})")
        with self._open(name, shape) as (_, tensor_slice):
            tensor = tensor_slice[index : index + 1][0]
        self.tensors_read.append(f"{name}[{index}]")
        return tensor.to(device=device, dtype=dtype or _DTYPES[self.spec.dtype])

    @contextlib.contextmanager
    def _open(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[Any, Any]]:
        """(file handle, lazy slice) of ``name``, checked present, of ``shape`` and a dtype."""
        fpath = self._files.get(name)
        if fpath is None:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.path}")
        with safe_open(str(fpath), framework="pt") as handle:
            tensor_slice = handle.get_slice(name)
            found_shape = tuple(tensor_slice.get_shape())
            if found_shape != tuple(shape):
                raise CheckpointError(
                    f"tensor {name!r} in {fpath.name} has shape {list(found_shape)}, "
                    f"expected {list(shape)} from config.json"
                )
            stored = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
            if stored is None:
                raise CheckpointError(
                    f"tensor {name!r} has dtype {tensor_slice.get_dtype()}, not supported "
                    f"(supported: {', '.join(_SAFETENSORS_DTYPES)})"
                )
            yield handle, tensor_slice

    def load_many(
        self,
        items: Iterable[tuple[str, tuple[int, ...]]],
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        return {name: self.load(name, shape, dtype, device) for name, shape in items}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a supported dtype name (``float32``, ``float16``, ``bfloat16``)."""
    if name not in _DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported (supported: {SUPPORTED_DTYPES})")
    return _DTYPES[name]
