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
from experts.layers import RotaryEmbedding, rms_norm
from experts.spec import ModelSpec
from experts.weights import BackboneWeights, LayerWeights, load_backbone

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
        eps = self.spec.rms_norm_eps
        for i, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.input_norm, eps)
            x = x + self._attention(i, layer, h, batch, kv)
            h = rms_norm(x, layer.post_attention_norm, eps)
            x = x + self._mlp(i, layer, h)
        return rms_norm(x, self.weights.final_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] in fp32."""
        return F.linear(hidden, self.weights.lm_head).float()

    def _attention(
        self, i: int, layer: LayerWeights, h: torch.Tensor, batch: AttentionBatch, kv: KVLayers
    ) -> torch.Tensor:
        spec, a = self.spec, layer.attention
        num_tokens = h.shape[0]
        qkv = F.linear(h, a.qkv, a.qkv_bias)  # [T, Hq*D + 2*Hkv*D]
        q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        if spec.family.qk_norm == "full":  # OLMoE: norm over all heads at once
            assert a.q_norm is not None and a.k_norm is not None
            q, k = (
                rms_norm(q, a.q_norm, spec.rms_norm_eps),
                rms_norm(k, a.k_norm, spec.rms_norm_eps),
            )
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        q = q.reshape(num_tokens, spec.num_heads, spec.head_dim)  # [T, Hq, D]
        k = k.reshape(num_tokens, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, D]
        v = v.reshape(num_tokens, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, D]
        if spec.family.qk_norm == "head":  # Qwen3: norm each head over D
            assert a.q_norm is not None and a.k_norm is not None
            q, k = (
                rms_norm(q, a.q_norm, spec.rms_norm_eps),
                rms_norm(k, a.k_norm, spec.rms_norm_eps),
            )
        q, k = self.rope.apply(q, k, batch.positions)
        out = paged_attention(q, k, v, kv.key(i), kv.value(i), batch, self.scale)  # [T, Hq*D]
        return F.linear(out, a.o)  # [T, H]

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
