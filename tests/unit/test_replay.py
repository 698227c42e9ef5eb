"""``moe-cluster replay``: request building, comparison, and the CLI against a fake gRPC server."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from deploy.audit import AuditLog, AuditRecord, AuditSettings
from deploy.cli import build_parser, main
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc
from deploy.replay import ReplayError, compare, format_diff, request_from_record
from tests.loopback_grpc import loopback_grpc_server
from tests.unit.test_audit import make_record


def fake_tokens(request: pb.GenerateRequest) -> list[int]:
    """What the fake cluster generates: fixed by the seed; tier "other" parts at index 4."""
    seed = request.seed if request.HasField("seed") else 0
    tokens = [(seed * 7 + i) % 100 for i in range(request.max_tokens)]
    if request.tier == "other":
        tokens[4:] = [t + 1 for t in tokens[4:]]
    return tokens


class FakeCluster(pb_grpc.MoEClusterServicer):
    """Streams ``fake_tokens`` three per chunk, text "t<id> " per token; keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        self.requests.append(request)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        tokens = fake_tokens(request)
        for start in range(0, len(tokens), 3):
            part = tokens[start : start + 3]
            chunk = pb.GenerateChunk(token_ids=part, text="".join(f"t{t} " for t in part))
            if start + 3 >= len(tokens):
                chunk.finish_reason = "length"
                chunk.tier.name = request.tier
                chunk.usage.completion_tokens = len(tokens)
            yield chunk


@pytest.fixture
def cluster() -> Iterator[tuple[str, FakeCluster]]:
    servicer = FakeCluster()
    with loopback_grpc_server(
        lambda s: pb_grpc.add_MoEClusterServicer_to_server(servicer, s)
    ) as port:
        yield f"127.0.0.1:{port}", servicer


def recorded(request_id: str = "req-1", **overrides: Any) -> AuditRecord:
    """A record whose output is what the fake cluster answers on its tier."""
    base = make_record(request_id, **overrides)
    tokens = fake_tokens(request_from_record(base))
    return dataclasses.replace(
        base, output_token_ids=tokens, output_text="".join(f"t{t} " for t in tokens)
    )


def write_log(tmp_path: Path, *records: AuditRecord) -> Path:
    log = AuditLog(AuditSettings(path=str(tmp_path / "requests.jsonl"), record_text=True))
    for record in records:
        log.append(record)
    assert log.num_errors == 0
    return log.path


def test_request_from_record_reproduces_the_request() -> None:
    request = request_from_record(make_record())
    assert list(request.token_ids) == [1, 2, 3] and request.prompt == ""
    assert request.tier == "fast" and request.max_tokens == 8
    assert request.HasField("seed") and request.seed == 42
    assert request.temperature == pytest.approx(0.7) and request.top_p == 1.0
    assert list(request.stop) == ["\n\n"]
    kv = request.kv_policy
    assert (kv.kind, kv.window, kv.sinks) == ("window", 64, 4)
    assert [(a.start, a.end) for a in kv.anchors] == [(0, 3)]


def test_request_from_record_other_tier_sends_text() -> None:
    request = request_from_record(make_record(), tier="strong")
    assert request.tier == "strong" and request.prompt == "Hi" and not request.token_ids
    ids_only = request_from_record(make_record(prompt=None), tier="strong")
    assert list(ids_only.token_ids) == [1, 2, 3]
    text_only = request_from_record(make_record(prompt_token_ids=None))
    assert text_only.prompt == "Hi" and not text_only.token_ids


def test_request_from_record_without_seed_or_text() -> None:
    unseeded = make_record(sampling={"max_tokens": 5})
    assert not request_from_record(unseeded).HasField("seed")
    with pytest.raises(ReplayError, match=r"audit\.record_text: true"):
        request_from_record(make_record().without_text())


def test_compare_and_format() -> None:
    same = compare([1, 2, 3], [1, 2, 3])
    assert same.identical and same.first_difference is None
    assert format_diff(same, "recorded", "new") == "identical: 3 tokens"
    diff = compare(list(range(20)), [*range(10), 99, 98])
    assert not diff.identical and diff.first_difference == diff.common_prefix == 10
    text = format_diff(diff, "recorded", "new", "abc def", "abc xyz")
    assert "first difference at token 10 (common prefix 10 tokens; recorded 20, new 12)" in text
    assert "… 4 5 6 7 8 9 | 10 11 12 13 14 15 …" in text
    assert "4 5 6 7 8 9 | 99 98" in text
    assert "text differs from character 4" in text and "'abc ' | 'xyz'" in text
    prefix = compare([1, 2], [1, 2, 3])
    assert prefix.first_difference == 2 and "1 2 | (end)" in format_diff(prefix, "r", "n")


def test_help() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["replay", "--help"])
    assert info.value.code == 0


def test_replay_identical(
    cluster: tuple[str, FakeCluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = cluster
    path = write_log(tmp_path, recorded("other-req", tier="strong"), recorded())
    code = main(["replay", "req-1", "--audit-log", str(path), "--server", address])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("identical: 8 tokens (tier fast, finish length)")
    (request,) = fake.requests
    assert list(request.token_ids) == [1, 2, 3] and request.seed == 42 and request.tier == "fast"


def test_replay_different_on_another_tier(
    cluster: tuple[str, FakeCluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = cluster
    path = write_log(tmp_path, recorded())
    args = ["replay", "req-1", "--audit-log", str(path), "--server", address, "--tier", "other"]
    assert main([*args, "--api-key", "k"]) == 1
    out = capsys.readouterr().out
    assert "first difference at token 4 (common prefix 4 tokens; recorded 8, new 8)" in out
    assert "recorded (tier fast, finish length)" in out and "new (tier other," in out
    assert fake.requests[0].prompt == "Hi"  # text on another tier
    assert fake.metadata[0]["authorization"] == "Bearer k"
    assert main([*args, "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is False and result["first_difference"] == 4
    assert result["new"]["tier"] == "other" and len(result["new"]["token_ids"]) == 8


def test_replay_different_output(
    cluster: tuple[str, FakeCluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = cluster
    record = recorded()
    assert record.output_token_ids is not None
    changed = dataclasses.replace(record, output_token_ids=[*record.output_token_ids[:6], 7, 7])
    path = write_log(tmp_path, changed)
    assert main(["replay", "req-1", "--audit-log", str(path), "--server", address]) == 1
    assert "first difference at token 6" in capsys.readouterr().out


def test_replay_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path, recorded())
    assert main(["replay", "nope", "--audit-log", str(path)]) == 2
    assert f"no record of request 'nope' in {path}" in capsys.readouterr().err
    assert main(["replay", "x", "--audit-log", str(tmp_path / "none.jsonl")]) == 2
    assert "is audit.enabled true" in capsys.readouterr().err
    stripped = write_log(tmp_path / "stripped", recorded("bare").without_text())
    assert main(["replay", "bare", "--audit-log", str(stripped)]) == 2
    assert "set audit.record_text: true" in capsys.readouterr().err
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["replay", "req-1", "--audit-log", str(path), "--server", f"127.0.0.1:{port}"]
    assert main(args) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
