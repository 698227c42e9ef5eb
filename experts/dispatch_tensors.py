"""The tensor side of dispatch: gather one shard's inputs, and combine shards' partial sums.

The plan itself (``router.dispatch``) is ids and ints; these helpers take its plain lists
(``ShardWork.token_index`` and ``ShardWork.pairs``), so ``experts/`` never imports the
router.

Legend: T tokens in the step, K experts chosen per token, H hidden, N tokens sent to
one shard, K' pairs per token on that shard (padded to the shard's longest row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from experts.shard import PAD_EXPERT


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
    when there is none).
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
        # rows are unique within a partial; index_put_ is far cheaper than index_add_ on CPU
        out.index_put_((rows,), part, accumulate=True)
    return out


def split_by_owner(
    owner: torch.Tensor,  # [E] long: the shard index holding each expert (one replica each)
    num_shards: int,
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, K] long
    weights: torch.Tensor,  # [T, K] fp32
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Each shard's rows and ``ExpertShard.compute`` inputs, with whole-tensor ops only.

    The fast path of dispatch when every expert has exactly one shard: no per-pair Python.
    Per shard: the tokens with at least one pair on it ``[N]``, their hidden rows, and all K
    pair slots with those of other shards padded (``PAD_EXPERT``, weight 0), which the shard
    skips: the same sums as ``gather_shard_inputs``, K' = K. ``None`` for a shard with no work.
    """
    shard_of_pair = owner[expert_ids]  # [T, K]
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    for s in range(num_shards):
        mine = shard_of_pair == s  # [T, K]
        rows = mine.any(dim=1).nonzero().squeeze(1)  # [N]
        if rows.numel() == 0:
            out.append(None)
            continue
        mine = mine[rows]  # [N, K]
        ids = expert_ids[rows].masked_fill(~mine, PAD_EXPERT)  # [N, K]
        shard_weights = weights[rows].masked_fill(~mine, 0.0)  # [N, K]
        out.append((rows, hidden[rows], ids, shard_weights))
    return out
