"""Batch-1 decode against this machine's memory-bandwidth limit (the roofline).

A decode step of one sequence must read, at least once, every weight it uses and the
sequence's cached keys and values; at batch 1 nothing is shared between tokens, so no
step can beat ``bandwidth / bytes per token``. Bytes per token: one embedding row; per
layer its norms, attention projections, gate and dense or shared MLP (every backbone
tensor of the layer), the K chosen experts' weights, and the K/V cache read at the
step's context; the final norm and the LM head. Bandwidth: a plain sum over a tensor
far larger than the last-level cache, the median of several reads, measured in the
same run as the decode it is compared with.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from experts.backend import ColocatedExperts
from experts.model import MoEModel

READ_BYTES = 512 * 2**20  # 16x a 32 MiB L3; large enough that caches do not matter
READS = 5  # median of these, after one untimed read


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) weights dataclass; None fields count 0."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(item) for item in obj)
    return 0


def expert_bytes(model: MoEModel) -> int:
    """Bytes of one routed expert's weights (gate, up and down)."""
    spec = model.spec
    if isinstance(model.experts, ColocatedExperts):
        slots = model.experts.layer_slots(spec.moe_layers[0])
        return tensor_bytes(slots.gate_up[0]) + tensor_bytes(slots.down[0])
    itemsize = model.weights.embed.element_size()
    return 3 * spec.hidden_size * spec.moe_intermediate_size * itemsize


def decode_bytes_per_token(model: MoEModel, context: float) -> dict[str, float]:
    """What one batch-1 decode step reads, by part, at ``context`` keys per layer."""
    spec, w = model.spec, model.weights
    itemsize = w.embed.element_size()
    kv_per_key = 2 * spec.num_kv_heads * spec.head_dim * itemsize  # K and V, one layer
    parts = {
        "embedding_row": float(w.embed[0].numel() * itemsize),
        "backbone_layers": float(tensor_bytes(w.layers)),  # attention, norms, gates, MLPs
        "active_experts": float(
            len(spec.moe_layers) * spec.num_experts_per_tok * expert_bytes(model)
        ),
        "kv_cache": float(spec.num_layers * context * kv_per_key),
        "final_norm_and_lm_head": float(tensor_bytes([w.final_norm, w.lm_head])),
    }
    return {**parts, "total": sum(parts.values())}


def read_bandwidth(num_bytes: int = READ_BYTES, reads: int = READS) -> dict[str, Any]:
    """Memory read bandwidth in bytes/s: the median of ``reads`` sums over one big tensor."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()  # first touch and warm-up
    seconds = []
    for _ in range(reads):
        start = time.perf_counter()
        x.sum()
        seconds.append(time.perf_counter() - start)
    return {
        "bytes_per_s": num_bytes / statistics.median(seconds),
        "read_s": [round(s, 5) for s in seconds],
    }
