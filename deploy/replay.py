"""``moe-cluster replay``: re-run a recorded request on a cluster and compare the tokens.

The audit record (``deploy/audit.py``) holds everything that decides a request's output:
the prompt, the sampling settings with the effective seed, stop strings, the KV policy and
the tier. Sent again with the tier forced, a deterministic engine must produce the same
token ids; a difference points at a numerical or scheduling change (or, with ``--tier``,
shows how another tier answers the same request). Building the request and comparing the
outputs are pure functions; only :func:`run_replay` talks to the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from deploy import audit
from deploy.audit import AuditRecord
from deploy.client import ClientOptions, MoEClusterClient, RemoteResult
from deploy.proto import moecluster_v1_pb2 as pb

EXIT_IDENTICAL, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2
DEFAULT_SERVER = "127.0.0.1:9000"
TOKEN_CONTEXT = 6  # tokens shown on each side of the first difference
TEXT_CONTEXT = 40  # characters shown on each side of the first text difference


class ReplayError(Exception):
    """A record that cannot be replayed; the message says what to change."""


@dataclass(frozen=True)
class ReplayDiff:
    """Recorded vs new output token ids; ``common_prefix`` is also the first differing index."""

    recorded: tuple[int, ...]
    new: tuple[int, ...]
    common_prefix: int

    @property
    def identical(self) -> bool:
        return self.recorded == self.new

    @property
    def first_difference(self) -> int | None:
        return None if self.identical else self.common_prefix


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(recorded: Sequence[int], new: Sequence[int]) -> ReplayDiff:
    return ReplayDiff(tuple(recorded), tuple(new), common_prefix(recorded, new))


def request_from_record(record: AuditRecord, tier: str | None = None) -> pb.GenerateRequest:
    """The Generate request that reproduces ``record``, on its tier or on ``tier``.

    On the recorded tier the prompt token ids are sent (exact: no re-tokenisation); on
    another tier the prompt text is preferred, because that tier's tokenizer may differ.
    Temperature and top_p are always sent explicitly, the seed whenever one was recorded.
    """
    if not record.has_text:
        raise ReplayError(
            f"the record of request {record.request_id!r} has no prompt or output token ids: "
            "it was written with audit.record_text off; set audit.record_text: true in the "
            "cluster config to make new requests replayable"
        )
    target = tier or record.tier
    s = record.sampling
    if "max_tokens" not in s:
        raise ReplayError(f"the record of request {record.request_id!r} lacks sampling.max_tokens")
    kv = record.kv_policy
    request = pb.GenerateRequest(
        tier=target,
        max_tokens=int(s["max_tokens"]),
        temperature=float(s.get("temperature", 0.0)),
        top_p=float(s.get("top_p", 1.0)),
        top_k=int(s.get("top_k", 0)),
        stop=list(record.stop),
        stop_token_ids=[int(t) for t in s.get("stop_token_ids", [])],
        ignore_eos=bool(s.get("ignore_eos", False)),
        kv_policy=pb.KVPolicy(
            kind=str(kv.get("kind", "full")),
            window=int(kv.get("window", 0)),
            sinks=int(kv.get("sinks", 0)),
            anchors=[pb.Span(start=int(a), end=int(b)) for a, b in kv.get("anchors", [])],
        ),
    )
    if s.get("seed") is not None:
        request.seed = int(s["seed"])
    if record.prompt is not None and (target != record.tier or record.prompt_token_ids is None):
        request.prompt = record.prompt
    else:
        request.token_ids.extend(record.prompt_token_ids or [])
    return request


def run_replay(
    address: str, request: pb.GenerateRequest, api_key: str | None = None
) -> RemoteResult:
    """Stream ``request`` from the cluster at ``address``; gRPC errors propagate."""
    client = MoEClusterClient(address)
    result = RemoteResult()
    try:
        for chunk in client.stream(request, ClientOptions(api_key=api_key)):
            result.token_ids.extend(chunk.token_ids)
            result.text += chunk.text
            if chunk.finish_reason:
                result.finish_reason, result.last = chunk.finish_reason, chunk
    finally:
        client.close()
    return result


def _token_window(tokens: Sequence[int], at: int) -> str:
    start, end = max(0, at - TOKEN_CONTEXT), min(len(tokens), at + TOKEN_CONTEXT)
    before = " ".join(map(str, tokens[start:at]))
    after = " ".join(map(str, tokens[at:end])) or "(end)"
    return f"{'… ' if start else ''}{before} | {after}{' …' if end < len(tokens) else ''}"


def _text_window(text: str, at: int) -> str:
    return f"{text[max(0, at - TEXT_CONTEXT) : at]!r} | {text[at : at + TEXT_CONTEXT]!r}"


def format_diff(
    diff: ReplayDiff,
    recorded_label: str,
    new_label: str,
    recorded_text: str = "",
    new_text: str = "",
) -> str:
    """The human-readable verdict; ``|`` marks where the outputs part."""
    if diff.identical:
        return f"identical: {len(diff.new)} tokens"
    at = diff.common_prefix
    width = max(len(recorded_label), len(new_label))
    lines = [
        f"different: first difference at token {at} (common prefix {at} tokens; "
        f"recorded {len(diff.recorded)}, new {len(diff.new)})",
        f"  {recorded_label:<{width}}: {_token_window(diff.recorded, at)}",
        f"  {new_label:<{width}}: {_token_window(diff.new, at)}",
    ]
    if recorded_text or new_text:
        char = common_prefix(recorded_text, new_text)
        if recorded_text != new_text:
            lines.append(f"  text differs from character {char}:")
            lines.append(f"  {recorded_label:<{width}}: {_text_window(recorded_text, char)}")
            lines.append(f"  {new_label:<{width}}: {_text_window(new_text, char)}")
    return "\n".join(lines)


def add_replay_parser(sub: Any) -> None:
    """Register ``replay`` on the ``moe-cluster`` subparsers (``argparse._SubParsersAction``)."""
    replay = sub.add_parser(
        "replay",
        help="re-run a recorded request and compare the tokens",
        description="Send a request recorded in the audit log (needs audit.record_text) to a "
        "running cluster with the same prompt, sampling settings, seed, stop strings, KV "
        "policy and tier, and compare the output token ids. Exit code 0: identical, "
        "1: different (the first difference is shown), 2: error.",
    )
    replay.add_argument("request_id", metavar="REQUEST_ID", help="the request id to replay")
    replay.add_argument(
        "--tier", metavar="NAME", default=None, help="run on this tier instead of the recorded one"
    )
    replay.add_argument(
        "--audit-log",
        metavar="PATH",
        default=audit.AuditSettings().path,
        help="the audit log, the config's audit.path; rotated PATH.N are searched too "
        "(default %(default)s)",
    )
    replay.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=DEFAULT_SERVER,
        help=f"gRPC address of the cluster ({DEFAULT_SERVER})",
    )
    replay.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("MOE_CLUSTER_API_KEY"),
        help="API key (default: $MOE_CLUSTER_API_KEY)",
    )
    replay.add_argument("--json", action="store_true", help="print the comparison as JSON")


def _load(path: str, request_id: str) -> AuditRecord:
    record = audit.find(path, request_id)
    if record is not None:
        return record
    files = audit.log_files(path)
    if not files:
        raise ReplayError(
            f"no audit log at {path} (nor rotated {path}.N): is audit.enabled true in the "
            "cluster config, and is --audit-log its audit.path?"
        )
    searched = ", ".join(str(f) for f in files)
    raise ReplayError(f"no record of request {request_id!r} in {searched}")


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        record = _load(args.audit_log, args.request_id)
        request = request_from_record(record, args.tier)
    except ReplayError as err:
        print(f"moe-cluster replay: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    temperature = float(record.sampling.get("temperature", 0.0))
    if temperature > 0 and record.sampling.get("seed") is None:
        print(
            "moe-cluster replay: note: no seed recorded, sampled tokens will differ",
            file=sys.stderr,
        )
    try:
        result = run_replay(args.server, request, args.api_key)
    except grpc.RpcError as err:
        print(
            f"moe-cluster replay: {err.code().name}: {err.details()} (server {args.server})",
            file=sys.stderr,
        )
        return EXIT_ERROR
    assert record.output_token_ids is not None  # request_from_record checked has_text
    diff = compare(record.output_token_ids, result.token_ids)
    recorded_text = record.output_text or ""
    if args.json:
        print(json.dumps(_as_json(record, request.tier, diff, result)))
    elif diff.identical:
        print(f"{format_diff(diff, '', '')} (tier {request.tier}, finish {result.finish_reason})")
    else:
        print(
            format_diff(
                diff,
                f"recorded (tier {record.tier}, finish {record.finish_reason})",
                f"new (tier {request.tier}, finish {result.finish_reason})",
                recorded_text,
                result.text,
            )
        )
    return EXIT_IDENTICAL if diff.identical else EXIT_DIFFERENT


def _as_json(
    record: AuditRecord, tier: str, diff: ReplayDiff, result: RemoteResult
) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "identical": diff.identical,
        "first_difference": diff.first_difference,
        "common_prefix": diff.common_prefix,
        "recorded": {
            "tier": record.tier,
            "token_ids": list(diff.recorded),
            "text": record.output_text,
            "finish_reason": record.finish_reason,
        },
        "new": {
            "tier": tier,
            "token_ids": list(diff.new),
            "text": result.text,
            "finish_reason": result.finish_reason,
        },
    }
