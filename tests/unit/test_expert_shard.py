"""ExpertShard: loads only its slots, computes like the colocated backend, load/drop live."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from experts.backend import ColocatedExperts
from experts.checkpoint import CheckpointReader
from experts.ffn import swiglu_mlp
from experts.shard import PAD_EXPERT, ExpertShard, MissingExpertError
from experts.spec import CheckpointError
from experts.weights import expert_tensor_names, load_expert
from tests.checkpoints import build_family_checkpoint

HIDDEN = 64


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("shard") / "m", seed=3)


def _hidden(n: int, seed: int = 0) -> torch.Tensor:  # [N, H]
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _routing(
    n: int, experts: list[int], k: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, K] distinct experts per row, [N, K] fp32
    gen = torch.Generator().manual_seed(seed)
    choice = torch.stack([torch.randperm(len(experts), generator=gen)[:k] for _ in range(n)])
    ids = torch.tensor(experts)[choice]  # [N, K]
    weights = torch.softmax(torch.randn(n, k, generator=gen), dim=-1)  # [N, K]
    return ids, weights


def _names(reader: CheckpointReader, slots: list[tuple[int, int]]) -> list[str]:
    return [n for layer, e in slots for n in expert_tensor_names(reader.spec, layer, e)]


def test_reads_only_its_slots_tensors(path: Path) -> None:
    slots = [(2, 7), (0, 1)]
    shard = ExpertShard(path, slots=slots)
    assert shard.slots == [(0, 1), (2, 7)]
    assert shard.has(0, 1) and not shard.has(0, 2)
    assert sorted(shard.reader.tensors_read) == sorted(_names(shard.reader, slots))
    before = len(shard.reader.tensors_read)
    assert shard.load([(0, 1), (1, 4)]) == [(1, 4)]  # a held slot is not read again
    assert shard.reader.tensors_read[before:] == _names(shard.reader, [(1, 4)])


def test_compute_equals_colocated_when_the_shard_holds_the_layer(path: Path) -> None:
    reader = CheckpointReader(path)
    colocated = ColocatedExperts.from_checkpoint(reader, [(1, e) for e in range(8)])
    shard = ExpertShard(path, slots=[(1, e) for e in range(8)])
    hidden = _hidden(23)
    ids, weights = _routing(23, list(range(8)))
    expected = colocated.forward(1, hidden, ids, weights)
    assert torch.equal(shard.compute(1, hidden, ids, weights), expected)


def test_padding_pairs_are_skipped(path: Path) -> None:
    shard = ExpertShard(path, slots=[(0, 3), (0, 5)])
    hidden = _hidden(3)
    ids = torch.tensor([[5, PAD_EXPERT], [3, 5], [PAD_EXPERT, PAD_EXPERT]])
    weights = torch.tensor([[0.7, 0.0], [0.4, 0.6], [0.0, 0.0]])
    w3, w5 = (load_expert(CheckpointReader(path), 0, e, "cpu") for e in (3, 5))
    expected = torch.stack(
        [
            0.7 * swiglu_mlp(hidden[:1], w5)[0],
            0.4 * swiglu_mlp(hidden[1:2], w3)[0] + 0.6 * swiglu_mlp(hidden[1:2], w5)[0],
            torch.zeros(HIDDEN),
        ]
    )
    torch.testing.assert_close(shard.compute(0, hidden, ids, weights), expected)


def test_empty_batches(path: Path) -> None:
    shard = ExpertShard(path, slots=[(0, 0)])
    empty = torch.zeros(0, 2, dtype=torch.long)
    assert shard.compute(0, _hidden(0), empty, empty.float()).shape == (0, HIDDEN)
    none = torch.zeros(4, 0, dtype=torch.long)
    assert torch.equal(shard.compute(0, _hidden(4), none, none.float()), torch.zeros(4, HIDDEN))


def test_load_and_drop_between_calls_leave_other_slots_untouched(path: Path) -> None:
    shard = ExpertShard(path, slots=[(0, e) for e in range(4)])
    hidden = _hidden(17, seed=1)
    ids, weights = _routing(17, [0, 1], seed=1)
    before = shard.compute(0, hidden, ids, weights)
    shard.load([(0, 6), (2, 5)])
    shard.drop([(0, 3), (0, 2)])
    assert shard.slots == [(0, 0), (0, 1), (0, 6), (2, 5)]
    assert torch.equal(shard.compute(0, hidden, ids, weights), before)
    moved_ids, moved_weights = _routing(17, [0, 6], seed=2)  # the newly loaded slot serves too
    assert shard.compute(0, hidden, moved_ids, moved_weights).abs().sum() > 0


def test_a_dropped_slot_names_itself_and_the_shards_slots(path: Path) -> None:
    shard = ExpertShard(path, slots=[(0, 0), (0, 2), (1, 4)])
    shard.drop([(0, 2)])
    ids = torch.tensor([[0, 2]])
    with pytest.raises(MissingExpertError) as err:
        shard.compute(0, _hidden(1), ids, torch.tensor([[0.5, 0.5]]))
    message = str(err.value)
    assert "(layer 0, expert 2)" in message and "layer 0: [0]; layer 1: [4]" in message


def test_bad_drop_and_failed_load_change_nothing(path: Path) -> None:
    shard = ExpertShard(path, slots=[(0, 0), (0, 1)])
    with pytest.raises(ValueError, match=r"cannot drop layer 0: \[5\]: not held"):
        shard.drop([(0, 1), (0, 5)])
    assert shard.slots == [(0, 0), (0, 1)]
    with pytest.raises(CheckpointError, match="expert 99 out of range"):
        shard.load([(0, 5), (0, 99)])
    assert shard.slots == [(0, 0), (0, 1)] and not shard.has(0, 5)


def test_a_dropped_slots_storage_is_reused_in_place(path: Path) -> None:
    shard = ExpertShard(path, slots=[(0, 0), (0, 1)])
    storage = shard._layers[0]
    before = storage.storage_ids()
    shard.drop([(0, 1)])
    shard.load([(0, 6)])  # takes expert 1's storage slot: no reallocation
    assert storage.slots_of(6) == (1,) and storage.storage_ids() == before
    w6 = load_expert(CheckpointReader(path), 0, 6, "cpu")
    assert torch.equal(storage.read_slot(1).gate_up, w6.gate_up)  # [2I, H]
    assert torch.equal(storage.read_slot(1).down, w6.down)


def test_sized_layers_take_new_experts_without_reallocating(path: Path) -> None:
    shard = ExpertShard(path, slots=[(0, 0)], slots_per_layer=4)
    before = shard._layers[0].storage_ids()
    shard.load([(0, 3), (0, 5), (0, 7)])
    assert shard._layers[0].storage_ids() == before and shard._layers[0].num_free == 0
    shard.load([(0, 2)])  # a fifth expert: the layer grows (doubles)
    assert shard._layers[0].num_slots == 8 and shard.has(0, 2)


def test_a_running_compute_keeps_the_weights_it_started_with(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop during a compute must not let a load overwrite the storage the compute reads."""
    from experts.expert_slots import SlotWeights

    shard = ExpertShard(path, slots=[(0, 0), (0, 1)])
    hidden = _hidden(5, seed=2)
    ids, weights = _routing(5, [0, 1], seed=2)
    expected = shard.compute(0, hidden, ids, weights)
    started, release = threading.Event(), threading.Event()
    real = SlotWeights.expert_sum

    def slow(*args: Any) -> torch.Tensor:
        started.set()
        assert release.wait(30)
        return real(*args)

    monkeypatch.setattr(SlotWeights, "expert_sum", slow)
    results: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: results.append(shard.compute(0, hidden, ids, weights)))
    worker.start()
    assert started.wait(30)
    shard.drop([(0, 1)])
    shard.load([(0, 6)])  # expert 1's storage is still being read: expert 6 goes elsewhere
    assert shard._layers[0].slots_of(6) != (1,)
    release.set()
    worker.join(30)
    assert torch.equal(results[0], expected)
    shard.load([(0, 7)])  # the compute ended: expert 1's storage is free again
    assert shard._layers[0].slots_of(7) == (1,)


def test_computes_go_on_while_a_load_writes_its_slots(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load writes (and on CPU prepacks) its new slots outside the lock computes take, and
    a failed write leaves the shard as it was, its reserved slots free again."""
    from experts.expert_slots import ExpertSlots

    shard = ExpertShard(path, slots=[(0, 0), (0, 1)], slots_per_layer=4)
    hidden = _hidden(3, seed=4)
    ids, weights = _routing(3, [0, 1], seed=4)
    expected = shard.compute(0, hidden, ids, weights)
    writing, release = threading.Event(), threading.Event()
    real = ExpertSlots.write_slot

    def slow(self: ExpertSlots, slot: int, w: Any) -> None:
        writing.set()
        assert release.wait(30)
        real(self, slot, w)

    monkeypatch.setattr(ExpertSlots, "write_slot", slow)
    loader = threading.Thread(target=lambda: shard.load([(0, 5)]))
    loader.start()
    assert writing.wait(30)
    assert torch.equal(shard.compute(0, hidden, ids, weights), expected)  # not blocked
    assert not shard.has(0, 5)  # not visible before its weights are written
    release.set()
    loader.join(30)
    assert shard.has(0, 5)

    def failing(self: ExpertSlots, slot: int, w: Any) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(ExpertSlots, "write_slot", failing)
    free = shard._layers[0].num_free
    with pytest.raises(RuntimeError, match="disk gone"):
        shard.load([(0, 6)])
    assert not shard.has(0, 6) and shard._layers[0].num_free == free
