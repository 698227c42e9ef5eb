"""Attention over a paged KV cache, for a batch of sequences of different lengths.

Each sequence brings some new tokens (a prefill chunk, or one decode token)
and a block table: the KV-pool blocks holding its keys in logical order. New
keys/values are written into their slots first; then every sequence gathers
its keys through its block table and attends with a causal mask. Sequences
with the same number of new tokens (and key counts within a factor 1.5) share
one ``scaled_dot_product_attention``
call, padded only in keys: all decodes of a step are one call, and a prefill
chunk in the same step is another. A group that needs no mask (decodes with
equal key counts; prompts of equal length with nothing cached, causal) passes
none, which lets SDPA take its unmasked kernels.

An optional ``AttentionProbe`` asks for diagnostics at some sequences' last
query: the attention entropy and the mass on the sequence's first tokens,
computed explicitly in fp32 beside (not instead of) the SDPA call.

Legend: T new tokens in the batch, B sequences, G sequences of a group, Q new
tokens of each sequence in a group, C most keys of one sequence in a group
(of the probed sequences, in a probe), P probed sequences, Hq/Hkv query/kv
heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from experts.attention_masks import group_mask, with_sinks


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a forward pass.

    ``num_cached`` keys are already in the cache (in ``block_table`` order);
    ``num_new`` tokens are computed now, at ``start_position`` onwards.
    ``start_position`` differs from ``num_cached`` only when a KV policy has
    dropped blocks (positions keep counting; the dropped keys are gone).
    """

    block_table: Sequence[int]
    num_cached: int
    num_new: int
    start_position: int

    @property
    def num_keys(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences with the same number of new tokens, attended in one padded SDPA call.

    Grouping by new-token count means no query is padding: a long prefill chunk
    never makes the decode rows of the same step pay for its query length.
    """

    rows: torch.Tensor  # [G*Q] rows in [T] of the group's queries, sequence-major
    key_slots: torch.Tensor  # [G, C] flat slots of each sequence's keys (padding: slot 0)
    mask: torch.Tensor | None  # [G, 1, Q, C] True where a query may attend a key; None: below
    causal: bool  # with no mask: Q == C and query i sees keys 0..i; else it sees every key
    in_order: bool  # rows are exactly 0..T-1: the group is the whole batch


# Finite, unlike -inf, so that a padding key's p * log p is 0 * MASKED = 0, not nan; far below
# any real score, so its probability underflows to exactly 0.
MASKED = -1e30


@dataclass(frozen=True)
class AttentionProbe:
    """Attention diagnostics at the last new token of some sequences, one entry per layer.

    Each layer's ``paged_attention`` appends (entropy [P], first_mass [P]) to ``results``:
    the softmax over the sequence's cached and new keys, averaged over query heads, its
    entropy in nats and its mass on the keys of the sequence's first tokens. It is the
    layer's own softmax: a sliding layer's over its window's keys only, and with attention
    sinks one over the keys and the sink, of which the keys' share is described (as
    transformers' attention weights are: the sink's probability counts in neither figure).
    Kept keys stay in position order, so those keys are a prefix of the sequence's keys:
    ``first_keys`` of them (a window policy, or a sliding group's freed blocks, may have
    evicted some or all, which then carry no mass).
    """

    rows: torch.Tensor  # [P] row in [T] of each probed sequence's last new token
    key_slots: torch.Tensor  # [P, C] flat slots of each probed sequence's keys (padding: 0)
    key_bias: torch.Tensor  # [P, 1, 1, C] fp32 score bias: 0 on real keys, MASKED on padding
    first_weight: torch.Tensor  # [P, 1, C, 1] fp32: 1 on keys holding a first token, else 0
    key_index: torch.Tensor  # [P, 1, 1, C] each key's index minus the probed query's own
    results: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        last_rows: Sequence[int],
        first_keys: Mapping[int, int],
        block_size: int,
        device: torch.device,
        results: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> AttentionProbe:
        """Probe chunk b (a key of ``first_keys``) at ``last_rows[b]``.

        ``first_keys[b]`` of chunk b's keys (cached and new) hold its first tokens. Layers
        append to ``results`` (a new list by default; a window batch shares its batch's).
        """
        probed = sorted(first_keys)  # [P] chunk indices
        assert probed and 0 <= probed[0] and probed[-1] < len(chunks), probed
        seqs = [chunks[b] for b in probed]
        key_slots = _key_slots(seqs, block_size)  # [P, C]
        key_pos = torch.arange(key_slots.shape[1])  # [C]
        num_first = [min(first_keys[b], c.num_keys) for b, c in zip(probed, seqs, strict=True)]
        counts = torch.tensor([[c.num_keys for c in seqs], num_first])  # [2, P]
        padding = key_pos[None, :] >= counts[0, :, None]  # [P, C]
        first = key_pos[None, :] < counts[1, :, None]  # [P, C]
        return cls(
            rows=torch.tensor([last_rows[b] for b in probed], dtype=torch.long, device=device),
            key_slots=key_slots.masked_fill_(padding, 0).to(device),
            key_bias=(padding * MASKED)[:, None, None, :].to(device),
            first_weight=first.float()[:, None, :, None].to(device),
            key_index=(key_pos[None, :] - counts[0, :, None] + 1)[:, None, None, :].to(device),
            results=[] if results is None else results,
        )


@dataclass(frozen=True)
class AttentionBatch:
    """Index tensors for one forward pass, built once and shared by all layers."""

    positions: torch.Tensor  # [T] rotary position of each new token
    slot_mapping: torch.Tensor  # [T] flat KV-pool slot each new token's K/V is written to
    last_index: torch.Tensor  # [B] row in [T] of each sequence's last new token
    groups: tuple[AttentionGroup, ...]
    probe: AttentionProbe | None = None  # diagnostics some sequences asked for
    # the same tokens over a sliding KV group's own block tables (``cache.kv_groups``): the
    # sliding layers attend (and write) through it; None: every layer uses this batch
    window: AttentionBatch | None = None

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        block_size: int,
        device: torch.device,
        probe: Mapping[int, int] | None = None,
        windows: Sequence[tuple[Sequence[int], int]] | None = None,
        probe_results: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> AttentionBatch:
        """Index tensors for ``chunks``; ``probe`` maps a chunk's index to its first-token keys.

        A probed chunk gets diagnostics at its last new token (see ``AttentionProbe``).
        ``windows`` gives each chunk's sliding-group block table and the cached keys it
        holds (the latest ones: its earlier blocks were freed); it builds ``window``.
        """
        # Built with a handful of tensor ops per group rather than per-sequence ones: this
        # runs once per engine step, and per-sequence ops cost ~0.1 ms each at decode.
        first: list[int] = []  # row in [T] of each sequence's first new token
        by_new: dict[tuple[int, int], list[int]] = {}
        num_tokens = 0
        for b, chunk in enumerate(chunks):
            assert chunk.num_new > 0, f"sequence {b} has no new tokens"
            assert len(chunk.block_table) * block_size >= chunk.num_keys, (
                f"sequence {b}: {len(chunk.block_table)} blocks cannot hold {chunk.num_keys} keys"
            )
            first.append(num_tokens)
            num_tokens += chunk.num_new
            by_new.setdefault((chunk.num_new, _key_bucket(chunk.num_keys)), []).append(b)
        positions = torch.empty(num_tokens, dtype=torch.long)
        slots = torch.empty(num_tokens, dtype=torch.long)
        groups = []
        for (num_new, _), members in by_new.items():
            group = [chunks[b] for b in members]
            rows, group_positions, group_slots, key_slots, mask = _group_tensors(
                group, [first[b] for b in members], num_new, block_size
            )
            positions[rows] = group_positions
            slots[rows] = group_slots
            in_order = len(by_new) == 1  # one group: sequence-major rows are 0..T-1
            unmasked = len({c.num_keys for c in group}) == 1 and (
                num_new == 1 or all(c.num_cached == 0 for c in group)
            )  # no key padding, and either one query or a plain causal square
            groups.append(
                AttentionGroup(
                    rows.to(device),
                    key_slots.to(device),
                    None if unmasked else mask.to(device),
                    unmasked and num_new > 1,
                    in_order,
                )
            )
        last = [f + c.num_new - 1 for f, c in zip(first, chunks, strict=True)]
        probed = None
        if probe:
            probed = AttentionProbe.build(chunks, last, probe, block_size, device, probe_results)
        window = None
        if windows is not None:
            window_chunks = [
                SequenceChunk(table, cached, c.num_new, c.start_position)
                for c, (table, cached) in zip(chunks, windows, strict=True)
            ]
            # keys dropped from the front of a window table no longer count as first keys
            window_probe = {
                b: max(0, keys - (chunks[b].num_cached - windows[b][1]))
                for b, keys in (probe or {}).items()
            }
            shared = probed.results if probed is not None else None
            window = cls.build(window_chunks, block_size, device, window_probe, None, shared)
        return cls(
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            last_index=torch.tensor(last, dtype=torch.long, device=device),
            groups=tuple(groups),
            probe=probed,
            window=window,
        )


def _key_slots(chunks: Sequence[SequenceChunk], block_size: int) -> torch.Tensor:  # [G, C]
    """Flat slot of each sequence's keys in cache order; keys past a sequence's end are junk."""
    max_c = max(c.num_keys for c in chunks)
    num_blocks = -(-max_c // block_size)  # blocks the longest sequence's keys span
    tables = []
    for chunk in chunks:
        table = list(chunk.block_table[:num_blocks])
        tables.append(table + [0] * (num_blocks - len(table)))
    key_pos = torch.arange(max_c)  # [C]
    block_of_key = torch.tensor(tables, dtype=torch.long)[:, key_pos // block_size]  # [G, C]
    return block_of_key * block_size + key_pos % block_size  # [G, C]


# Sequences in one group are padded to the group's longest key list: every step gathers (and
# attends over) all of it. Bucketing key lengths by factors of 1.5 from 64 up bounds that
# padding at 1.5x while adding few SDPA calls: a decode batch with keys from 16 to 768 is ~8
# groups instead of one padded to 768 (measured ~2x less gather on the bench preset).
_BUCKET_BASE, _BUCKET_GROWTH = 64, 1.5


def _key_bucket(num_keys: int) -> int:
    if num_keys <= _BUCKET_BASE:
        return 0
    return 1 + int(math.log(num_keys / _BUCKET_BASE, _BUCKET_GROWTH))


def _group_tensors(
    chunks: Sequence[SequenceChunk], first: Sequence[int], num_new: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, positions, write slots, key slots and mask of sequences with ``num_new`` tokens."""
    key_slots = _key_slots(chunks, block_size)  # [G, C]
    per_seq = [list(first), [c.num_cached for c in chunks], [c.start_position for c in chunks]]
    first_row, cached, start_pos = torch.tensor(per_seq, dtype=torch.long)  # [G] each
    key_pos = torch.arange(key_slots.shape[1])  # [C]
    q_pos = torch.arange(num_new)  # [Q]
    key_index = cached[:, None] + q_pos[None, :]  # [G, Q] key index of each query
    # query i sits at key index num_cached + i and sees keys up to it (never key padding)
    mask = key_pos[None, None, :] <= key_index[:, :, None]  # [G, Q, C]
    key_slots.masked_fill_(~mask[:, -1, :], 0)  # padding keys read slot 0, masked out
    write_slots = key_slots.gather(1, key_index)  # [G, Q]
    positions = start_pos[:, None] + q_pos[None, :]  # [G, Q]
    rows = first_row[:, None] + q_pos[None, :]  # [G, Q]
    flat = rows.reshape(-1), positions.reshape(-1), write_slots.reshape(-1)
    return *flat, key_slots, mask[:, None]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] (rotated)
    k: torch.Tensor,  # [T, Hkv, D] (rotated)
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [S, Hkv, D] flat view of one layer's key blocks (S slots)
    v_cache: torch.Tensor,  # [S, Hkv, D]
    batch: AttentionBatch,
    scale: float,
    masks: Sequence[torch.Tensor | None] | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:  # [T, Hq * D]
    """Write the new K/V into the cache, then attend every query to its sequence's keys.

    ``masks`` replace the groups' own (one per group: a sliding layer's window masks; None
    for a group whose own mask is its window mask);
    ``sinks`` [Hq] add a learned sink logit per head (``experts.attention_masks``). The
    probe's diagnostics honour both (``window``: the sliding layer's window).
    """
    k_cache.index_copy_(0, batch.slot_mapping, k)  # in place, into each token's slot
    v_cache.index_copy_(0, batch.slot_mapping, v)
    if batch.probe is not None:
        stats = _probe_stats(q, k_cache, batch.probe, scale, sinks, window)
        batch.probe.results.append(stats)
    num_tokens, num_heads, head_dim = q.shape
    out = None if batch.groups[0].in_order else q.new_empty(num_tokens, num_heads, head_dim)
    for index, group in enumerate(batch.groups):
        num_seqs, max_c = group.key_slots.shape
        max_q = group.rows.shape[0] // num_seqs
        q_group = q if group.in_order else q.index_select(0, group.rows)  # [G*Q, Hq, D]
        qb = q_group.view(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)  # [G, Hq, Q, D]
        # index_select on the flat slot list is ~2x faster than advanced indexing with [G, C]
        flat_slots = group.key_slots.reshape(-1)  # [G*C]
        kv_shape = (num_seqs, max_c, k_cache.shape[1], head_dim)  # [G, C, Hkv, D]
        kb = k_cache.index_select(0, flat_slots).view(kv_shape).transpose(1, 2)  # [G, Hkv, C, D]
        vb = v_cache.index_select(0, flat_slots).view(kv_shape).transpose(1, 2)  # [G, Hkv, C, D]
        mask, causal = group.mask, group.causal
        if masks is not None and masks[index] is not None:
            mask, causal = masks[index], False
        if sinks is not None:  # [G, Hkv, C+1, D] x2, float bias [G, Hq, Q, C+1]
            kb, vb, mask = with_sinks(kb, vb, group_mask(group) if mask is None else mask, sinks)
            causal = False
        attended = F.scaled_dot_product_attention(
            qb,
            kb,
            vb,
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=num_heads != kb.shape[1],
        )  # [G, Hq, Q, D]
        attended = attended.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [G*Q, Hq, D]
        if out is None:
            return attended.reshape(num_tokens, num_heads * head_dim)
        out[group.rows] = attended
    assert out is not None
    return out.reshape(num_tokens, num_heads * head_dim)  # [T, Hq*D]


def _probe_stats(
    q: torch.Tensor,  # [T, Hq, D] (rotated)
    k_cache: torch.Tensor,  # [S, Hkv, D] (this step's keys already written)
    probe: AttentionProbe,
    scale: float,
    sinks: torch.Tensor | None = None,  # [Hq] a sink logit per head
    window: int | None = None,  # a sliding layer's: keys before the window are hidden
) -> tuple[torch.Tensor, torch.Tensor]:  # entropy [P], first-token mass [P]
    """Explicit fp32 softmax of the probed queries over their keys (and the sink); stats
    over the keys, averaged over heads.

    Query head h reads kv head h // (Hq/Hkv), as in every GQA reference: viewing the heads
    as [Hkv, Hq/Hkv] lets one matmul serve a kv head's whole query group.
    """
    num_probed, max_c = probe.key_slots.shape
    _, num_kv_heads, head_dim = k_cache.shape
    qp = q.index_select(0, probe.rows).float() * scale  # [P, Hq, D]
    qp = qp.view(num_probed, num_kv_heads, -1, head_dim)  # [P, Hkv, Hq/Hkv, D]
    keys = k_cache.index_select(0, probe.key_slots.view(-1)).float()  # [P*C, Hkv, D]
    keys = keys.view(num_probed, max_c, num_kv_heads, head_dim).permute(0, 2, 3, 1)  # [P,Hkv,D,C]
    scores = torch.matmul(qp, keys) + probe.key_bias  # [P, Hkv, Hq/Hkv, C]
    if window is not None:  # the query sees keys (own - window, own]
        scores = scores.masked_fill(probe.key_index <= -window, MASKED)
    if sinks is not None:  # one more outcome per head: [P, Hkv, Hq/Hkv, C+1]
        sink = sinks.float().view(1, num_kv_heads, -1, 1).expand(num_probed, -1, -1, 1)
        scores = torch.cat([scores, sink], dim=-1)
    log_p = torch.log_softmax(scores, dim=-1)[..., :max_c]  # [P, Hkv, Hq/Hkv, C]
    p = log_p.exp()  # padding keys: exactly 0
    entropy = -(p * log_p).sum(-1)  # [P, Hkv, Hq/Hkv]
    first_mass = torch.matmul(p, probe.first_weight)  # [P, Hkv, Hq/Hkv, 1]
    return entropy.mean((1, 2)), first_mass.mean((1, 2, 3))  # [P], [P]
