"""The MoE backbone: embeddings, attention over paged KV, the gate, and an expert backend.

One ``forward`` serves prefill chunks and decode tokens of many sequences at
once (see ``experts.attention``). MoE layers compute the gate here and hand
the routed tokens to the expert backend; dense and shared-expert MLPs stay in
the backbone.

Legend: T tokens, H hidden, V vocab, E experts, K experts per token,
Hq/Hkv query/kv heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from cache.kv_policy import window_position_limit
from experts.attention import AttentionBatch, paged_attention
from experts.backend import ColocatedExperts, ExpertBackend
from experts.checkpoint import CheckpointReader
from experts.ffn import swiglu_mlp
from experts.gate import route
from experts.layers import RotaryAngles, RotaryEmbedding, rms_norm, rotate
from experts.spec import ModelSpec
from experts.weights import AttentionWeights, BackboneWeights, LayerWeights, load_backbone

RouteObserver = Callable[[int, torch.Tensor], None]  # (layer, expert ids [T, K])


class KVLayers(Protocol):
    """Per-layer flat views of a paged KV pool: [slots, Hkv, D] each."""

    def key(self, layer: int) -> torch.Tensor: ...

    def value(self, layer: int) -> torch.Tensor: ...


class MoEModel:
    """A decoder-only model whose routed experts live behind an ``ExpertBackend``."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: BackboneWeights,
        experts: ExpertBackend | None,
        device: str | torch.device = "cpu",
    ) -> None:
        if spec.is_moe:
            assert experts is not None, "an MoE model needs an expert backend"
        self.spec = spec
        self.weights = weights
        self.experts = experts
        self.device = torch.device(device)
        # positions past the context are a windowed sequence's, up to the limit that
        # admission enforces (cache.kv_policy): the tables grow by doubling to cover them
        context = spec.max_position_embeddings
        self.rope = RotaryEmbedding(
            spec.head_dim, spec.rope_theta, context, self.device, window_position_limit(context)
        )
        self.scale = spec.head_dim**-0.5
        self.route_observer: RouteObserver | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", experts: ExpertBackend | None = None
    ) -> MoEModel:
        """Load the backbone; the experts come from ``experts``, else all of them in-process."""
        reader = CheckpointReader(path)
        if reader.spec.is_moe and experts is None:
            experts = ColocatedExperts.from_checkpoint(reader, device=device)
        return cls(reader.spec, load_backbone(reader, device), experts, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def forward(
        self, input_ids: torch.Tensor, batch: AttentionBatch, kv: KVLayers
    ) -> torch.Tensor:  # [T, H] final-normed hidden states
        """Run every layer on the batch's new tokens [T], reading and writing ``kv``."""
        assert input_ids.shape == batch.positions.shape, (
            f"{tuple(input_ids.shape)} ids vs {tuple(batch.positions.shape)} positions"
        )
        x = self.weights.embed[input_ids]  # [T, H]
        angles = self.rope.at(batch.positions, x.dtype)  # shared by every layer
        eps = self.spec.rms_norm_eps
        for i, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.input_norm, eps)
            x = x + self._attention(i, layer, h, angles, batch, kv)
            h = rms_norm(x, layer.post_attention_norm, eps)
            x = x + self._mlp(i, layer, h)
        return rms_norm(x, self.weights.final_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] in fp32."""
        return F.linear(hidden, self.weights.lm_head).float()

    def _attention(
        self,
        i: int,
        layer: LayerWeights,
        h: torch.Tensor,
        angles: RotaryAngles,
        batch: AttentionBatch,
        kv: KVLayers,
    ) -> torch.Tensor:
        spec, a = self.spec, layer.attention
        num_q, num_kv = spec.num_heads, spec.num_kv_heads
        qkv = h @ a.qkv if a.qkv_bias is None else torch.addmm(a.qkv_bias, h, a.qkv)
        # qkv: [T, (Hq + 2*Hkv)*D]
        heads = qkv.view(h.shape[0], num_q + 2 * num_kv, spec.head_dim)  # [T, Hq+2Hkv, D]
        qk, v = heads.split([num_q + num_kv, num_kv], dim=1)  # [T, Hq+Hkv, D], [T, Hkv, D]
        if spec.family.qk_norm != "none" or spec.clip_qkv is not None:
            qk, v = self._qk_norm_and_clip(a, qk, v)
        # q and k heads rotate by the same angles: one rotation over both
        q, k = rotate(qk, angles).split([num_q, num_kv], dim=1)  # [T, Hq, D], [T, Hkv, D]
        out = paged_attention(q, k, v, kv.key(i), kv.value(i), batch, self.scale)  # [T, Hq*D]
        return out @ a.o  # [T, H]

    def _qk_norm_and_clip(
        self,
        a: AttentionWeights,
        qk: torch.Tensor,  # [T, Hq+Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [T, Hq+Hkv, D], [T, Hkv, D]
        """The families' q/k norms and qkv clipping, in their references' order."""
        spec, eps = self.spec, self.spec.rms_norm_eps
        q, k = qk.split([spec.num_heads, spec.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        if spec.family.qk_norm == "full":  # OLMoE: norm over all heads at once, then clip
            assert a.q_norm is not None and a.k_norm is not None
            q = rms_norm(q.reshape(q.shape[0], -1), a.q_norm, eps).view(q.shape)
            k = rms_norm(k.reshape(k.shape[0], -1), a.k_norm, eps).view(k.shape)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        if spec.family.qk_norm == "head":  # Qwen3: norm each head over D
            assert a.q_norm is not None and a.k_norm is not None
            q, k = rms_norm(q, a.q_norm, eps), rms_norm(k, a.k_norm, eps)
        return torch.cat([q, k], dim=1), v

    def _mlp(self, i: int, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        if layer.router is None:
            assert layer.dense_mlp is not None, f"layer {i} has neither router nor MLP"
            return swiglu_mlp(h, layer.dense_mlp)
        assert self.experts is not None
        ids, weights = route(
            h, layer.router, self.spec.num_experts_per_tok, self.spec.norm_topk_prob
        )  # [T, K], [T, K]
        if self.route_observer is not None:
            self.route_observer(i, ids)
        out = self.experts.forward(i, h, ids, weights)  # [T, H]
        if layer.shared_expert is not None:
            assert layer.shared_expert_gate is not None
            gate = torch.sigmoid(F.linear(h, layer.shared_expert_gate))  # [T, 1]
            out = out + gate * swiglu_mlp(h, layer.shared_expert)
        return out
