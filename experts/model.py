"""The MoE backbone: embeddings, attention over paged KV, the gate, and an expert backend.

One ``forward`` serves prefill chunks and decode tokens of many sequences at
once (see ``experts.attention``). MoE layers compute the gate here and hand
the routed tokens to the expert backend; dense and shared-expert MLPs stay in
the backbone. DeepSeek-V3 layers attend with multi-head latent attention
(``experts.mla``); gpt-oss layers add attention sinks, and its sliding layers a
window mask (``experts.attention_masks``) over their own block tables when the batch has them
(``AttentionBatch.window``: the sliding KV group keeps only its window's blocks).

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
from experts.attention_masks import window_masks
from experts.backend import ColocatedExperts, ExpertBackend
from experts.checkpoint import CheckpointReader
from experts.ffn import swiglu_mlp
from experts.gate import (
    route,
    route_grouped_sigmoid,
    route_grouped_softmax,
    route_topk_softmax,
)
from experts.layers import RotaryAngles, RotaryEmbedding, rms_norm, rotate
from experts.mla import mla_attention
from experts.mla_weights import MLAWeights
from experts.spec import ModelSpec
from experts.weights import (
    AttentionWeights,
    BackboneWeights,
    LayerWeights,
    load_backbone,
)

RouteObserver = Callable[[int, torch.Tensor], None]  # (layer, expert ids [T, K])


class KVLayers(Protocol):
    """Per-layer flat views of a paged KV pool: [slots, Hkv, D] each (MLA models use
    ``key`` only: [slots, 1, R + Dr] latent entries, ``ModelSpec.kv_cache_shape``)."""

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
            spec.rotary_width,
            spec.rope_theta,
            context,
            self.device,
            window_position_limit(context),
            spec.rope_scaling,
        )
        self.scale = spec.head_dim**-0.5
        if spec.is_mla:  # YaRN's mscale applies to the whole q.k for MLA (DeepSeek)
            self.scale = spec.rope_scaling.softmax_scale(self.scale)
        self.mla_absorb: bool | None = None  # None: per group, by cost (experts.mla)
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
        eps, spec = self.spec.rms_norm_eps, self.spec
        # the sliding layers attend over their own block tables when the batch has them
        sliding = batch.window if batch.window is not None else batch
        windows = None  # [G|1, 1, Q, C] per group (None: its own mask), shared by them
        if spec.has_sliding_layers:
            assert spec.sliding_window is not None
            windows = window_masks(sliding, spec.sliding_window)
        for i, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.input_norm, eps)
            if spec.is_sliding_layer(i):
                x = x + self._attention(i, layer, h, angles, sliding, kv, windows, True)
            else:
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
        masks: tuple[torch.Tensor | None, ...] | None = None,
        sliding: bool = False,
    ) -> torch.Tensor:
        spec, a = self.spec, layer.attention
        if isinstance(a, MLAWeights):
            return mla_attention(spec, a, h, angles, batch, kv.key(i), self.scale, self.mla_absorb)
        num_q, num_kv = spec.num_heads, spec.num_kv_heads
        qkv = h @ a.qkv if a.qkv_bias is None else torch.addmm(a.qkv_bias, h, a.qkv)
        # qkv: [T, (Hq + 2*Hkv)*D]
        heads = qkv.view(h.shape[0], num_q + 2 * num_kv, spec.head_dim)  # [T, Hq+2Hkv, D]
        qk, v = heads.split([num_q + num_kv, num_kv], dim=1)  # [T, Hq+Hkv, D], [T, Hkv, D]
        if spec.qk_norm != "none" or spec.clip_qkv is not None:
            qk, v = self._qk_norm_and_clip(a, qk, v)
        # q and k heads rotate by the same angles: one rotation over both
        q, k = rotate(qk, angles).split([num_q, num_kv], dim=1)  # [T, Hq, D], [T, Hkv, D]
        window = spec.sliding_window if sliding else None  # for the probe's softmax
        out = paged_attention(
            q, k, v, kv.key(i), kv.value(i), batch, self.scale, masks, a.sinks, window
        )  # [T, Hq*D]
        return out @ a.o if a.o_bias is None else torch.addmm(a.o_bias, out, a.o)  # [T, H]

    def _qk_norm_and_clip(
        self,
        a: AttentionWeights,
        qk: torch.Tensor,  # [T, Hq+Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [T, Hq+Hkv, D], [T, Hkv, D]
        """The families' q/k norms and qkv clipping, in their references' order."""
        spec, eps = self.spec, self.spec.rms_norm_eps
        q, k = qk.split([spec.num_heads, spec.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        if spec.qk_norm == "full":  # OLMoE: norm over all heads at once, then clip
            assert a.q_norm is not None and a.k_norm is not None
            q = rms_norm(q.reshape(q.shape[0], -1), a.q_norm, eps).view(q.shape)
            k = rms_norm(k.reshape(k.shape[0], -1), a.k_norm, eps).view(k.shape)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        if spec.qk_norm == "head":  # Qwen3, GLM-4.5: norm each head over D
            assert a.q_norm is not None and a.k_norm is not None
            q, k = rms_norm(q, a.q_norm, eps), rms_norm(k, a.k_norm, eps)
        return torch.cat([q, k], dim=1), v

    def _mlp(self, i: int, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        if layer.router is None:
            assert layer.dense_mlp is not None, f"layer {i} has neither router nor MLP"
            return swiglu_mlp(h, layer.dense_mlp)
        assert self.experts is not None
        ids, weights = self._route(layer, h)  # [T, K], [T, K]
        if self.route_observer is not None:
            self.route_observer(i, ids)
        out = self.experts.forward(i, h, ids, weights)  # [T, H]
        if layer.shared_expert is not None:
            shared = swiglu_mlp(h, layer.shared_expert)  # [T, H]
            if layer.shared_expert_gate is not None:  # Qwen2-MoE
                shared = torch.sigmoid(F.linear(h, layer.shared_expert_gate)) * shared
            out = out + shared
        return out

    def _route(
        self, layer: LayerWeights, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ids [T, K], weights [T, K] fp32
        spec, gate = self.spec, self.spec.family.gate
        assert layer.router is not None
        if gate == "grouped_sigmoid":
            assert layer.score_bias is not None
            return route_grouped_sigmoid(
                h,
                layer.router,
                layer.score_bias,
                spec.num_experts_per_tok,
                spec.n_group,
                spec.topk_group,
                spec.norm_topk_prob,
                spec.routed_scaling_factor,
            )
        if gate == "grouped_softmax":
            return route_grouped_softmax(
                h,
                layer.router,
                spec.num_experts_per_tok,
                spec.n_group,
                spec.topk_group,
                spec.routed_scaling_factor,
            )
        if gate == "topk_softmax":
            assert layer.router_bias is not None
            return route_topk_softmax(h, layer.router, layer.router_bias, spec.num_experts_per_tok)
        return route(h, layer.router, spec.num_experts_per_tok, spec.norm_topk_prob)
