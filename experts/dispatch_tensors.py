"""The tensor side of dispatch: split a layer's tokens by shard, and combine shards' partial sums.

``split_by_shard`` is the hot path: given the shard of every (token, k) pair, it gathers each
shard's rows with a fixed number of whole-tensor ops whatever the number of shards (one
comparison against every shard index, one ``nonzero``, one gather per input tensor, and the
per-shard views cut from those with ``torch.split``), and its only host read is the per-shard
row counts. ``gather_shard_inputs`` is the same for one shard from a plan's plain lists
(``router.dispatch``'s ``ShardWork``), pair by pair: the reference that the split is tested
against, so that ``experts/`` never imports the router.

Legend: T tokens in the step, K experts chosen per token, H hidden, S shards, N tokens sent to
one shard, R rows sent to all shards together (sum of N; a token sent to two shards counts
twice), K' pairs per token on a shard (padded to the shard's longest row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from experts.shard import PAD_EXPERT


@dataclass(frozen=True)
class ShardSplit:
    """One layer's tokens grouped by shard: shard ``s`` owns the ``counts[s]`` rows after the
    rows of shards ``0..s-1`` in each of ``token_index``, ``hidden``, ``expert_ids`` and
    ``weights``; a shard's tokens are increasing. Pairs of other shards are padding
    (``PAD_EXPERT``, weight 0), which a shard skips; K' = K."""

    counts: list[int]  # [S] rows per shard, on the host
    token_index: torch.Tensor  # [R] long: the step token of each row
    hidden: torch.Tensor  # [R, H]
    expert_ids: torch.Tensor  # [R, K] long
    weights: torch.Tensor  # [R, K] fp32
    touched: torch.Tensor  # [S, T] bool: shard s computes at least one pair of token t

    def parts(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(shard index, token_index [N], hidden [N, H], ids [N, K], weights [N, K]) per shard
        with work, in shard order; views of this split's tensors."""
        counts = self.counts
        pieces = zip(
            range(len(counts)),
            counts,
            self.token_index.split_with_sizes(counts),  # Tensor.split's Python wrapper costs
            self.hidden.split_with_sizes(counts),  # more than the op at these sizes
            self.expert_ids.split_with_sizes(counts),
            self.weights.split_with_sizes(counts),
            strict=True,
        )
        return [(s, rows, h, ids, w) for s, n, rows, h, ids, w in pieces if n]

    @property
    def fan_out(self) -> torch.Tensor:  # [T] long
        """For each token of the step, how many shards it is sent to."""
        return self.touched.sum(dim=0)


def split_by_shard(
    shard_of_pair: torch.Tensor,  # [T, K] long in 0..S-1: the shard computing each pair
    num_shards: int,
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, K] long
    weights: torch.Tensor,  # [T, K] fp32
    shard_index: torch.Tensor | None = None,  # [S, 1, 1] long: 0..S-1 (a caller may keep one)
) -> ShardSplit:
    """Each shard's rows and ``ExpertShard.compute`` inputs, gathered once for all shards.

    Every pair is compared with every shard index: row ``s * T + t`` of the [S * T, K] result
    marks token t's pairs on shard s. The rows with any pair set, found by one ``nonzero``,
    are the (shard, token) rows to send, already ordered by shard then token; each input is
    then one masked copy and one gather over all R rows. Gives each shard the same tensors as
    ``gather_shard_inputs`` with K' = K (the same sums).
    """
    num_tokens, num_k = shard_of_pair.shape
    if shard_index is None:
        shard_index = torch.arange(num_shards, device=shard_of_pair.device).view(-1, 1, 1)
    mine = shard_of_pair.unsqueeze(0) == shard_index  # [S, T, K]
    touched = mine.any(dim=2)  # [S, T]
    flat = touched.view(-1).nonzero().squeeze(1)  # [R] s * T + t, ordered by shard, then token
    counts = touched.sum(dim=1).tolist()  # [S]
    token_index = flat.remainder(num_tokens) if num_shards > 1 else flat  # [R]
    ids = torch.where(mine, expert_ids, PAD_EXPERT).view(-1, num_k)  # [S * T, K]
    gate = torch.where(mine, weights, 0.0).view(-1, num_k)  # [S * T, K]
    return ShardSplit(
        counts,
        token_index,
        hidden.index_select(0, token_index),  # [R, H]
        ids.index_select(0, flat),  # [R, K]
        gate.index_select(0, flat),  # [R, K]
        touched,
    )


def gather_shard_inputs(
    token_index: Sequence[int],
    pairs: Sequence[Sequence[tuple[int, int]]],
    hidden: torch.Tensor,  # [T, H] the layer's step input
    weights: torch.Tensor,  # [T, K] fp32 gate weights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [N, H], [N, K'] long, [N, K'] fp32
    """The ``ExpertShard.compute`` inputs for one shard's rows and (k slot, expert) pairs.

    Rows shorter than the longest are padded with (``PAD_EXPERT``, weight 0) pairs.
    """
    assert len(token_index) == len(pairs), f"{len(token_index)} rows vs {len(pairs)} pair lists"
    device = hidden.device
    num_k = max((len(row) for row in pairs), default=0)
    ids = [[e for _, e in row] + [PAD_EXPERT] * (num_k - len(row)) for row in pairs]
    slots = [[k for k, _ in row] + [0] * (num_k - len(row)) for row in pairs]
    tokens = torch.tensor(token_index, dtype=torch.long, device=device)  # [N]
    expert_ids = torch.tensor(ids, dtype=torch.long, device=device).reshape(len(pairs), num_k)
    k_index = torch.tensor(slots, dtype=torch.long, device=device).reshape(len(pairs), num_k)
    shard_weights = weights[tokens[:, None], k_index]  # [N, K']
    shard_weights = shard_weights.masked_fill(expert_ids == PAD_EXPERT, 0.0)  # [N, K']
    return hidden[tokens], expert_ids, shard_weights


def combine(
    num_tokens: int,
    hidden_size: int,
    partials: Sequence[tuple[Sequence[int] | torch.Tensor, torch.Tensor]],  # ([N], [N, H])
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:  # [T, H]
    """Sum the shards' partial results into the full layer output, partial by partial.

    Each token's output is ``0 + p_1 + p_2 + ...`` over the shards that computed it, in
    the order of ``partials``. A token served by one shard gets that shard's partial
    bit for bit. ``dtype`` and ``device`` default to the first partial's (fp32 on CPU
    when there is none); a partial on another device is copied to ``device``.
    """
    first = partials[0][1] if partials else torch.empty(0)
    dtype = first.dtype if dtype is None else dtype
    device = first.device if device is None else device
    out = torch.zeros(num_tokens, hidden_size, dtype=dtype, device=device)  # [T, H]
    for token_index, part in partials:
        assert part.shape == (len(token_index), hidden_size) and part.dtype == out.dtype, (
            f"partial {tuple(part.shape)} {part.dtype} for {len(token_index)} tokens, "
            f"expected ({len(token_index)}, {hidden_size}) {out.dtype}"
        )
        rows = torch.as_tensor(token_index, dtype=torch.long, device=out.device)  # [N]
        # rows are unique within a partial: one add per element and partial, exact and
        # deterministic. On CPU index_add_ took 7 us at 32 tokens and one thread against
        # 15-22 for index_put_(accumulate=True), but forks the OpenMP team past a few rows
        # (~100 us on a busy node): RemoteExperts runs its combine on one thread
        out.index_add_(0, rows, part.to(out.device))
    return out


def rows_choosing(
    expert_ids: torch.Tensor,  # [T, K]
    experts: Sequence[int],
) -> tuple[tuple[int, ...], int]:
    """The token rows that route to one of ``experts`` (sorted), and the number of rows."""
    wanted = torch.tensor(list(experts), dtype=expert_ids.dtype, device=expert_ids.device)
    rows = torch.isin(expert_ids, wanted).any(dim=1).nonzero().flatten().tolist()
    return tuple(rows), int(expert_ids.shape[0])
