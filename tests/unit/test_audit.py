"""Audit records: JSON round trip, rotation, lookup across rotated files, error handling,
and bounded records (capped request fields, no line over its share of the file)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cache.kv_policy import KVPolicy
from deploy.audit import (
    MAX_CHARS,
    MAX_ITEMS,
    AuditLog,
    AuditRecord,
    AuditSettings,
    capped,
    find,
    fitted,
    kv_policy_record,
    log_files,
    routing_summary,
    sampling_record,
    utc_timestamp,
)
from experts.sampling_params import SamplingParams


def make_record(request_id: str = "req-1", **overrides: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "time": utc_timestamp(0.0),
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "tier": "fast",
        "model": "/models/fast",
        "reason": "confident",
        "escalated": False,
        "confidence": -0.25,
        "sampling": sampling_record(SamplingParams(max_tokens=8, temperature=0.7, seed=42)),
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "finish_reason": "length",
        "stop": ["\n\n"],
        "kv_policy": kv_policy_record(KVPolicy("window", window=64, sinks=4, anchors=((0, 3),))),
        "prompt": "Hi",
        "prompt_token_ids": [1, 2, 3],
        "output_text": "abcd",
        "output_token_ids": [10, 11, 12, 13],
    }
    fields.update(overrides)
    return AuditRecord(**fields)


def settings(tmp_path: Path, **overrides: Any) -> AuditSettings:
    values: dict[str, Any] = {"enabled": True, "path": str(tmp_path / "audit" / "requests.jsonl")}
    values.update(overrides)
    return AuditSettings(**values)


def test_settings_defaults_and_validation() -> None:
    s = AuditSettings()
    assert (s.enabled, s.path, s.max_bytes, s.backups, s.record_text) == (
        False,
        "audit/requests.jsonl",
        64 * 2**20,
        5,
        False,
    )
    with pytest.raises(ValidationError, match="max_bytes"):
        AuditSettings(max_bytes=10)
    with pytest.raises(ValidationError, match="extra"):
        AuditSettings(unknown=1)  # type: ignore[call-arg]


def test_record_round_trip_and_helpers() -> None:
    record = make_record()
    assert AuditRecord.from_json(record.to_json()) == record
    assert record.time == "1970-01-01T00:00:00.000Z"
    assert record.sampling == {
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 42,
        "stop_token_ids": [],
        "ignore_eos": False,
    }
    assert record.kv_policy == {"kind": "window", "window": 64, "sinks": 4, "anchors": [[0, 3]]}


def test_old_records_and_unknown_keys_are_read() -> None:
    data = json.loads(make_record().to_json())
    for name in ("stop", "kv_policy", "cached_prompt_tokens", "routing", "prompt"):
        data.pop(name)
    data["added_in_a_later_version"] = {"x": 1}
    record = AuditRecord.from_json(json.dumps(data))
    assert record.stop == [] and record.kv_policy == {"kind": "full"}
    assert record.cached_prompt_tokens == 0 and record.prompt is None
    with pytest.raises(ValueError, match="lacks tier"):
        AuditRecord.from_json(json.dumps({k: v for k, v in data.items() if k != "tier"}))


def test_append_and_find_keep_text_when_asked(tmp_path: Path) -> None:
    log = AuditLog(settings(tmp_path, record_text=True))
    log.append(make_record("a"))
    log.append(make_record("b", tier="strong"))
    found = find(log.path, "b")
    assert found == make_record("b", tier="strong")
    assert find(log.path, "missing") is None
    assert log.num_errors == 0


def test_text_is_stripped_without_record_text(tmp_path: Path) -> None:
    log = AuditLog(settings(tmp_path))
    log.append(make_record("a"))
    line = log.path.read_text()
    assert "prompt_token_ids" not in line and "abcd" not in line
    found = find(log.path, "a")
    assert found is not None and not found.has_text
    assert found == make_record("a").without_text()


def test_rotation_keeps_backups_and_find_searches_them(tmp_path: Path) -> None:
    line_bytes = len(make_record("req-00").to_json()) + 1
    log = AuditLog(settings(tmp_path, max_bytes=max(1024, 2 * line_bytes), backups=2))
    per_file = log.settings.max_bytes // line_bytes
    total = per_file * 4
    for i in range(total):
        log.append(make_record(f"req-{i:02d}"))
    files = log_files(log.path)
    assert [f.name for f in files] == ["requests.jsonl", "requests.jsonl.1", "requests.jsonl.2"]
    assert all(f.stat().st_size <= log.settings.max_bytes for f in files)
    assert find(log.path, f"req-{total - 1:02d}") is not None  # current file
    assert find(log.path, f"req-{total - 2 * per_file - 1:02d}") is not None  # oldest backup
    assert find(log.path, "req-00") is None  # rotated out
    assert log.num_errors == 0


def test_rotation_without_backups_restarts_the_file(tmp_path: Path) -> None:
    log = AuditLog(settings(tmp_path, max_bytes=1024, backups=0))
    for i in range(20):
        log.append(make_record(f"r{i}"))
    assert log_files(log.path) == [log.path]
    assert log.path.stat().st_size <= 1024
    assert find(log.path, "r19") is not None and find(log.path, "r0") is None


def test_find_skips_malformed_lines_and_prefers_newest(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    old = make_record("x", tier="old")
    path.with_name("requests.jsonl.1").write_text(old.to_json() + "\n")
    path.write_text(
        '{"request_id": "x", truncated\n'
        + "[1, 2]\n"
        + json.dumps({"request_id": "x"})
        + "\n"
        + make_record("x", tier="new").to_json()
        + "\n"
        + '{"request_id": "x", "tier": "cut off mid-wr'
    )
    found = find(path, "x")
    assert found is not None and found.tier == "new"
    path.write_text("not json at all x\n")
    found = find(path, "x")
    assert found is not None and found.tier == "old"


def test_write_error_is_counted_and_warned_once_per_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    target = tmp_path / "requests.jsonl"
    target.mkdir()  # a directory where the file should be
    log = AuditLog(settings(tmp_path, path=str(target)), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="deploy.audit"):
        log.append(make_record("a"))
        log.append(make_record("b"))
        now[0] = 61.0
        log.append(make_record("c"))
    assert log.num_errors == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "deploy.audit"]
    assert len(warnings) == 2
    assert "request a" in warnings[0] and "request c" in warnings[1]


def test_unserialisable_record_is_counted_not_raised(tmp_path: Path) -> None:
    log = AuditLog(settings(tmp_path))
    log.append(make_record("a", routing={"bad": object()}))
    assert log.num_errors == 1 and not log.path.exists()


def test_routing_summary() -> None:
    routing = [
        ((0, (1, 2)), (1, (1, 3))),
        ((0, (1, 3)), (1, (1, 2))),
    ]
    shard_of = {1: 0, 2: 0, 3: 1}
    summary = routing_summary(routing, shard_of=lambda layer, expert: shard_of[expert])
    assert summary == {
        "num_tokens": 2,
        "num_layers": 2,
        "mean_experts_per_token": 2.0,
        "mean_shards_per_token": 1.5,  # (1 + 2 + 2 + 1) / 4 (token, layer) slots
        "hot_experts": [[0, 1, 2], [1, 1, 2], [0, 2, 1], [0, 3, 1], [1, 2, 1], [1, 3, 1]],
    }
    hinted = routing_summary(routing, num_layers_hint=4, max_hot=2)
    assert hinted is not None
    assert hinted["mean_experts_per_token"] == 1.0 and hinted["mean_shards_per_token"] is None
    assert hinted["hot_experts"] == [[0, 1, 2], [1, 1, 2]]
    assert routing_summary(None) is None and routing_summary([]) is None


def test_record_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_record().tier = "other"  # type: ignore[misc]


# --- bounded records ---------------------------------------------------------------------------


def test_settings_max_record_bytes() -> None:
    assert AuditSettings().max_record_bytes == 16 * 2**20  # a quarter of 64 MiB
    assert AuditSettings(max_bytes=8192).max_record_bytes == 2048
    assert AuditSettings(max_bytes=1024).max_record_bytes == 1024  # never under 1 KiB


def test_100k_stop_strings_do_not_make_a_1mb_line(tmp_path: Path) -> None:
    """Issue 13: 100k stop strings went whole into the record, a 1 MB line in a 1 KB log."""
    log = AuditLog(settings(tmp_path, max_bytes=1024))
    stops = [f"stop-{i}" for i in range(100_000)]
    log.append(make_record("big", stop=stops))
    assert log.num_errors == 0
    assert log.path.stat().st_size <= 1024
    found = find(log.path, "big")
    assert found is not None
    assert found.stop == []  # capped to 128 strings, still over 1 KiB: left out
    assert found.cut_fields == {"stop": 100_000}
    assert set(found.omitted_fields) == {"stop"} and found.omitted_fields["stop"] > 1024


def test_capped_cuts_request_lists_and_strings() -> None:
    record = make_record(
        "r" * 5000,
        stop=["x" * 5000, *(["ab"] * 1000)],
        sampling={**make_record().sampling, "stop_token_ids": list(range(2_000_000))},
        kv_policy={"kind": "window", "window": 64, "sinks": 0, "anchors": [[0, 1]] * 500},
        model="m" * 2000,
    )
    cut = capped(record)
    assert len(cut.stop) == MAX_ITEMS and cut.stop[0] == "x" * MAX_CHARS
    assert cut.sampling["stop_token_ids"] == list(range(MAX_ITEMS))
    assert cut.sampling["seed"] == 42  # the rest of the field is kept
    assert cut.kv_policy["anchors"] == [[0, 1]] * MAX_ITEMS and cut.kv_policy["window"] == 64
    assert cut.request_id == "r" * MAX_CHARS and cut.model == "m" * MAX_CHARS
    assert cut.cut_fields == {
        "stop": 1001,
        "sampling.stop_token_ids": 2_000_000,
        "kv_policy.anchors": 500,
        "request_id": 5000,
        "model": 2000,
    }
    assert len(cut.to_json()) < 200_000


def test_capped_leaves_a_bounded_record_alone() -> None:
    record = make_record(stop=["s" * MAX_CHARS] * MAX_ITEMS)
    assert capped(record) is record
    assert "cut_fields" not in record.to_json() and "omitted_fields" not in record.to_json()


def test_2m_stop_token_ids_are_capped_in_the_log(tmp_path: Path) -> None:
    log = AuditLog(settings(tmp_path))
    params = SamplingParams(max_tokens=8, stop_token_ids=tuple(range(2_000_000)))
    log.append(make_record("ids", sampling=sampling_record(params)))
    assert log.path.stat().st_size < 4096
    found = find(log.path, "ids")
    assert found is not None and len(found.sampling["stop_token_ids"]) == MAX_ITEMS
    assert found.cut_fields == {"sampling.stop_token_ids": 2_000_000}


def test_oversized_record_loses_its_largest_fields_first(tmp_path: Path) -> None:
    """A large prompt is left out (with its size); the smaller output text still fits."""
    log = AuditLog(settings(tmp_path, max_bytes=4096, record_text=True))
    prompt = "p" * 3000
    log.append(make_record("a", prompt=prompt))
    assert log.num_errors == 0
    line = log.path.read_bytes()
    assert len(line) <= log.settings.max_record_bytes
    found = find(log.path, "a")
    assert found is not None
    assert found.prompt is None and found.omitted_fields == {"prompt": len(json.dumps(prompt))}
    assert found.output_text == "abcd" and found.prompt_token_ids == [1, 2, 3]
    assert found.stop == ["\n\n"]


def test_fitted_leaves_out_fields_until_the_record_fits() -> None:
    record = make_record(prompt="p" * 600, output_text="o" * 500, stop=["s" * 200])
    line = fitted(record, 1024)
    assert len(line) <= 1024
    data = json.loads(line)
    assert set(data["omitted_fields"]) == {"prompt", "output_text"}  # the stop string still fits
    assert data["stop"] == ["s" * 200]
    assert fitted(make_record(), 1024) == (make_record().to_json() + "\n").encode()


def test_record_that_cannot_fit_is_counted_not_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(settings(tmp_path, max_bytes=1024))
    with caplog.at_level(logging.WARNING, logger="deploy.audit"):
        log.append(make_record("q" * 3000, model="m" * 1000))
    assert log.num_errors == 1 and not log.path.exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "deploy.audit"]
    assert "over the limit of 1024 bytes per record" in warning
    assert "q" * 65 not in warning  # the request id is cut in the log too


def test_files_stay_under_max_bytes_with_huge_requests(tmp_path: Path) -> None:
    log = AuditLog(settings(tmp_path, max_bytes=2048, backups=2, record_text=True))
    for i in range(20):
        log.append(make_record(f"r{i}", prompt="p" * 10_000, stop=["s"] * 10_000))
    assert log.num_errors == 0
    assert all(f.stat().st_size <= 2048 for f in log_files(log.path))
    found = find(log.path, "r19")
    assert found is not None and found.cut_fields == {"stop": 10_000}
    assert found.prompt is None and set(found.omitted_fields) == {"prompt", "stop"}
    assert found.has_text  # still replayable: by its prompt token ids


def test_notes_round_trip() -> None:
    record = make_record(cut_fields={"stop": 5}, omitted_fields={"prompt": 100})
    assert AuditRecord.from_json(record.to_json()) == record
