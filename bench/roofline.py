"""Batch-1 decode against this machine's memory-bandwidth limit (the roofline).

A decode step of one sequence must read, at least once, every weight it uses and the
sequence's cached keys and values; at batch 1 nothing is shared between tokens, so no
step can beat ``bandwidth / bytes per token``. Bytes per token: one embedding row; per
layer its norms, attention projections, gate and dense or shared MLP (every backbone
tensor of the layer), the K chosen experts' weights, and the K/V cache read at the
step's context; the final norm and the LM head. Bandwidth: a plain sum over a tensor
far larger than the last-level cache, the median of several reads, measured in the
same run as the decode it is compared with.

The expert kernel's own ceiling: ``ExpertKernelRead`` times the matmuls the model runs for a
batch-1 expert (one token through one slot's two projections, in the layout the model holds
its slots in, and none of the routing around them) over
slots far larger than the last-level cache, so every call reads its expert from memory.
Its bytes/s over ``read_bandwidth``'s says how much of the roofline the matmul library
itself can reach on this machine, before any of our code runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from experts.backend import ColocatedExperts
from experts.expert_slots import ExpertSlots
from experts.grouped_ffn import packed_linear
from experts.model import MoEModel
from experts.weights import MLPWeights

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
    itemsize = model.weights.embed.element_size()
    if isinstance(model.experts, ColocatedExperts):
        itemsize = model.experts.layer_slots(spec.moe_layers[0]).dtype.itemsize
    return 3 * spec.hidden_size * spec.moe_intermediate_size * itemsize


def decode_bytes_per_token(model: MoEModel, context: float) -> dict[str, float]:
    """What one batch-1 decode step reads, by part, at ``context`` keys per layer."""
    spec, w = model.spec, model.weights
    itemsize = w.embed.element_size()
    planes, heads, dim = spec.kv_cache_shape  # K and V per kv head, or MLA's latent entry
    kv_per_key = planes * heads * dim * itemsize  # one layer
    # MLA decode absorbs kv_b (it reads its per-head slices w_uk and w_uv, counted already)
    unread = sum(tensor_bytes(getattr(layer.attention, "kv_b", None)) for layer in w.layers)
    parts = {
        "embedding_row": float(w.embed[0].numel() * itemsize),
        # attention, norms, gates, MLPs
        "backbone_layers": float(tensor_bytes(w.layers) - unread),
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


class ExpertKernelRead:
    """The batch-1 expert kernel's read rate over slots that do not fit in any cache."""

    def __init__(self, model: MoEModel, num_bytes: int = READ_BYTES // 2) -> None:
        spec = model.spec
        hidden, inter = spec.hidden_size, spec.moe_intermediate_size
        layout_of = (
            model.experts.layer_slots(spec.moe_layers[0])
            if isinstance(model.experts, ColocatedExperts)
            else None
        )
        dtype = layout_of.dtype if layout_of is not None else model.dtype
        self.expert_bytes = expert_bytes(model)
        count = max(2, num_bytes // self.expert_bytes)
        self.slots = ExpertSlots(
            count, count, hidden, inter, dtype, "cpu", layout_of.layout if layout_of else None
        )
        gen = torch.Generator().manual_seed(0)
        for e in range(count):
            gate_up = torch.randn(2 * inter, hidden, generator=gen).to(dtype)  # [2I, H]
            self.slots.add(
                e, MLPWeights(gate_up, torch.randn(hidden, inter, generator=gen).to(dtype))
            )
        self.token = torch.randn(1, hidden, generator=gen).to(dtype)  # [1, H]
        self.count = count

    def measure(self, reads: int = READS) -> dict[str, Any]:
        """Bytes/s of one token through each slot's two projections in turn (the matmul
        calls alone, none of the routing around them), the median of ``reads`` passes."""
        slots, token = self.slots, self.token
        inter = slots.read_slot(0).down.shape[1]
        act = token.new_ones(1, inter)  # [1, I]
        if slots.layout == "packed":
            pairs = list(zip(slots.packed_gate_up, slots.packed_down, strict=True))

            def one_pass() -> None:
                for gate_up, down in pairs:
                    packed_linear(token, gate_up)  # [1, 2I]
                    packed_linear(act, down)  # [1, H]
        else:

            def one_pass() -> None:
                for s in range(self.count):
                    token @ slots.gate_up[s]  # [1, 2I]
                    act @ slots.down[s]  # [1, H]

        one_pass()  # warm-up
        seconds = []
        for _ in range(reads):
            start = time.perf_counter()
            one_pass()
            seconds.append(time.perf_counter() - start)
        return {
            "bytes_per_s": self.count * self.expert_bytes / statistics.median(seconds),
            "layout": slots.layout,
            "pass_s": [round(s, 5) for s in seconds],
        }
