"""Audit records: one JSON line per served request, enough to explain and replay it.

The gateway appends an :class:`AuditRecord` when a request finishes: which tier served it
and why, the sampling settings with the *effective* seed (the gateway picks one when the
client sent none, so every request can be replayed), the KV policy, usage, and a summary
of the expert routing. Prompt and output text are kept only with ``record_text``, because
they may hold personal data. ``moe-cluster replay`` (``deploy/replay.py``) reads records
back with :func:`find`.

A record never holds an unbounded value. Lists and short strings that come from the request
are cut to ``MAX_ITEMS`` items and ``MAX_CHARS`` characters (the edge, ``deploy.api``'s
``RequestLimits``, already bounds them far lower; ``cut_fields`` names what was cut, with
its original length). A whole line is at most ``AuditSettings.max_record_bytes``: a record
over it is written with its largest free-form fields (text, stop strings, routing) left
out, largest first, until it fits; ``omitted_fields`` gives each one's size in bytes.

The log rotates by size like ``logging.handlers.RotatingFileHandler`` (``requests.jsonl``,
then ``requests.jsonl.1`` … ``.N``, oldest last). It is written by hand rather than through
``logging`` so that sizes are counted in bytes of whole lines, nothing is formatted twice,
and no global logger state is involved. Rotation is safe between threads of one process;
processes sharing one path should not rotate it concurrently (give each its own path).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from deploy.sections import Section

if TYPE_CHECKING:  # the gateway writes records and must not load torch
    from cache.kv_policy import KVPolicy
    from experts.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WARNING_INTERVAL_S = 60.0
TEXT_FIELDS = ("prompt", "prompt_token_ids", "output_text", "output_token_ids")
# fields left out, largest first, when a record does not fit max_record_bytes
OMITTABLE_FIELDS = (*TEXT_FIELDS, "stop", "routing")
# defensive caps on what a request puts into a record (the edge's defaults are 16 stop
# strings of 256 bytes, 64 stop token ids, 64 anchors): a list keeps its first MAX_ITEMS
# items, a stop string or identifier its first MAX_CHARS characters
MAX_ITEMS = 128
MAX_CHARS = 1024
MIN_RECORD_BYTES = 1024  # the smallest max_record_bytes, and so the smallest max_bytes
SHORT_STRING_FIELDS = ("request_id", "trace_id", "tier", "model", "reason", "finish_reason")
# per generated token: ((layer, (expert, ...)), ...), as in cluster.serving.tier_messages.TierTokens
TokenRouting = Sequence[tuple[int, Sequence[int]]]


class AuditSettings(Section):
    """The ``audit`` section of the cluster config.

    ``enabled``: write a record per finished request (off by default: it is disk I/O on the
    serving path). ``path``: the JSON-lines file. ``max_bytes``: rotate once the file would
    grow past this; one record takes at most ``max_record_bytes`` of it. ``backups``:
    rotated files kept (0 = the file is simply restarted). ``record_text``: also keep
    prompt/output text and token ids; needed by ``moe-cluster replay``, off by default
    because prompts may hold personal data.
    """

    enabled: bool = False
    path: str = Field(default="audit/requests.jsonl", min_length=1)
    max_bytes: int = Field(default=64 * 2**20, ge=MIN_RECORD_BYTES)
    backups: int = Field(default=5, ge=0)
    record_text: bool = False

    @property
    def max_record_bytes(self) -> int:
        """The largest line: a quarter of ``max_bytes``, and at least 1 KiB.

        A file then holds at least four records, unless ``max_bytes`` is under 4 KiB.
        """
        return max(self.max_bytes // 4, MIN_RECORD_BYTES)


@dataclass(frozen=True)
class AuditRecord:
    """One finished request. Fields with defaults are optional when reading old records."""

    request_id: str
    time: str  # ISO-8601 UTC, see utc_timestamp()
    trace_id: str
    tier: str  # the tier that produced the output (after any cascade escalation)
    model: str
    reason: str  # why that tier: explicit, default, confident, low_confidence, ...
    escalated: bool
    confidence: float | None
    sampling: dict[str, Any]  # see sampling_record(); seed is the effective seed
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    stop: list[str] = field(default_factory=list)
    kv_policy: dict[str, Any] = field(default_factory=lambda: {"kind": "full"})
    cached_prompt_tokens: int = 0
    truncated_tokens: int = 0
    routing: dict[str, Any] | None = None  # see routing_summary()
    # field (dotted inside sampling/kv_policy) -> original length, for each value cut to
    # MAX_ITEMS items or MAX_CHARS characters; see capped()
    cut_fields: dict[str, int] = field(default_factory=dict)
    # field -> its size in bytes of JSON, for each left out to fit max_record_bytes
    omitted_fields: dict[str, int] = field(default_factory=dict)
    # only with AuditSettings.record_text:
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    output_text: str | None = None
    output_token_ids: list[int] | None = None

    def to_json(self) -> str:
        """One line of JSON; absent text fields and empty notes are left out."""
        data = dataclasses.asdict(self)
        for name in TEXT_FIELDS:
            if data[name] is None:
                del data[name]
        for name in ("cut_fields", "omitted_fields"):
            if not data[name]:
                del data[name]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> AuditRecord:
        """Parse a line; unknown keys are ignored, missing optional keys take their default.

        Raises ``ValueError`` for a line that is not a JSON object or lacks required keys.
        """
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError(f"an audit record is a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"audit record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def without_text(self) -> AuditRecord:
        return dataclasses.replace(
            self, prompt=None, prompt_token_ids=None, output_text=None, output_token_ids=None
        )

    @property
    def has_text(self) -> bool:
        """Whether the record can be replayed: a prompt and the output token ids."""
        prompt = self.prompt_token_ids is not None or self.prompt is not None
        return prompt and self.output_token_ids is not None


def capped(record: AuditRecord) -> AuditRecord:
    """``record`` with request-given lists cut to ``MAX_ITEMS`` and strings to ``MAX_CHARS``.

    Covers the stop strings, ``sampling.stop_token_ids``, ``kv_policy.anchors`` and the
    identifiers; each cut field is named in ``cut_fields`` with its original length. Text
    fields are left whole: they are bounded by the edge and by :func:`fitted`.
    """
    cut: dict[str, int] = {}
    changes: dict[str, Any] = {}
    stop = record.stop
    if len(stop) > MAX_ITEMS or any(len(s) > MAX_CHARS for s in stop):
        cut["stop"] = len(stop)
        changes["stop"] = [s[:MAX_CHARS] for s in stop[:MAX_ITEMS]]
    for name, key in (("sampling", "stop_token_ids"), ("kv_policy", "anchors")):
        values = getattr(record, name).get(key)
        if isinstance(values, list) and len(values) > MAX_ITEMS:
            cut[f"{name}.{key}"] = len(values)
            changes[name] = {**getattr(record, name), key: values[:MAX_ITEMS]}
    for name in SHORT_STRING_FIELDS:
        value = getattr(record, name)
        if len(value) > MAX_CHARS:
            cut[name] = len(value)
            changes[name] = value[:MAX_CHARS]
    if not cut:
        return record
    return dataclasses.replace(record, cut_fields={**record.cut_fields, **cut}, **changes)


def fitted(record: AuditRecord, max_bytes: int) -> bytes:
    """``record`` as one line of at most ``max_bytes`` bytes, newline included.

    A record over the limit loses its largest free-form fields (``OMITTABLE_FIELDS``) one
    at a time, each noted in ``omitted_fields`` with its size, until it fits. Raises
    ``ValueError`` when it does not fit even without them.
    """
    line = (record.to_json() + "\n").encode()
    if len(line) <= max_bytes:
        return line
    sizes = {
        name: len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
        for name in OMITTABLE_FIELDS
        if (value := getattr(record, name))
    }
    omitted = dict(record.omitted_fields)
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        omitted[name] = sizes[name]
        empty: Any = [] if name == "stop" else None
        record = dataclasses.replace(record, **{name: empty}, omitted_fields=dict(omitted))
        line = (record.to_json() + "\n").encode()
        if len(line) <= max_bytes:
            return line
    raise ValueError(
        f"the record is {len(line)} bytes even without {', '.join(omitted) or 'its text'}: "
        f"over the limit of {max_bytes} bytes per record"
    )


def utc_timestamp(now: float | None = None) -> str:
    """``now`` (seconds since the epoch, default the current time) as ISO-8601 UTC."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sampling_record(params: SamplingParams) -> dict[str, Any]:
    """The ``sampling`` field. Pass params whose seed is already the effective seed."""
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
    }


def kv_policy_record(policy: KVPolicy) -> dict[str, Any]:
    """The ``kv_policy`` field: kind, window, sinks, anchors as [[start, end], ...]."""
    return {
        "kind": policy.kind,
        "window": policy.window,
        "sinks": policy.sinks,
        "anchors": [[start, end] for start, end in policy.anchors],
    }


def routing_summary(
    routing: Sequence[TokenRouting] | None,
    num_layers_hint: int | None = None,
    shard_of: Callable[[int, int], int] | None = None,
    max_hot: int = 8,
) -> dict[str, Any] | None:
    """Summarise per-token routing into a few figures worth keeping per request.

    Means are per generated token *per MoE layer*, so models of different depth compare:
    ``mean_experts_per_token`` is the experts a token used in a layer (top-k, less when
    layers are missing from the routing: pass ``num_layers_hint`` to count them as zero);
    ``mean_shards_per_token`` is how many distinct shards those experts lived on, the
    dispatch fan-out (None without ``shard_of``). ``hot_experts`` lists the ``max_hot`` most
    used (layer, expert) pairs with their counts, most used first.
    """
    if not routing:
        return None
    counts: Counter[tuple[int, int]] = Counter()
    num_shards = 0
    layers: set[int] = set()
    for token in routing:
        for layer, experts in token:
            layers.add(layer)
            counts.update((layer, expert) for expert in experts)
            if shard_of is not None:
                num_shards += len({shard_of(layer, expert) for expert in experts})
    num_layers = max(num_layers_hint or 0, len(layers), 1)
    slots = len(routing) * num_layers
    hot = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_hot]
    return {
        "num_tokens": len(routing),
        "num_layers": num_layers,
        "mean_experts_per_token": round(counts.total() / slots, 4),
        "mean_shards_per_token": round(num_shards / slots, 4) if shard_of is not None else None,
        "hot_experts": [[layer, expert, n] for (layer, expert), n in hot],
    }


class AuditLog:
    """Appends records to a size-rotated JSON-lines file; never raises into serving.

    A failed write (disk full, unwritable path, unserialisable value) is counted in
    ``num_errors`` and logged at most once per ``WARNING_INTERVAL_S`` so that a broken disk
    does not flood the logs. ``append`` blocks on file I/O: call it off the event loop.
    """

    def __init__(self, settings: AuditSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.path = Path(settings.path)
        self.num_errors = 0
        self._clock = clock
        self._last_warning: float | None = None
        self._lock = threading.Lock()

    def append(self, record: AuditRecord) -> None:
        if not self.settings.record_text:
            record = record.without_text()
        try:
            line = fitted(capped(record), self.settings.max_record_bytes)
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._rotate_if_needed(len(line))
                with self.path.open("ab") as file:
                    file.write(line)
        except (OSError, TypeError, ValueError) as err:
            self._count_error(record.request_id, err)

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= self.settings.max_bytes:
            return
        if self.settings.backups == 0:
            self.path.unlink()
            return
        for index in range(self.settings.backups - 1, 0, -1):
            older = _backup(self.path, index)
            if older.exists():
                os.replace(older, _backup(self.path, index + 1))
        os.replace(self.path, _backup(self.path, 1))

    def _count_error(self, request_id: str, err: Exception) -> None:
        with self._lock:
            self.num_errors += 1
            now = self._clock()
            if self._last_warning is not None and now - self._last_warning < WARNING_INTERVAL_S:
                return
            self._last_warning = now
            count = self.num_errors
        logger.warning(
            "audit log %s: could not write request %s (%s: %s); %d write error(s) so far, "
            "serving continues",
            self.path,
            request_id[:64],  # identifiers are capped in records, and so in the log
            type(err).__name__,
            err,
            count,
        )


def _backup(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def log_files(path: str | Path) -> list[Path]:
    """The existing files of a log, newest first: ``path``, then ``path.1``, ``path.2``, …"""
    base = Path(path)
    pattern = re.compile(re.escape(base.name) + r"\.(\d+)")
    backups: list[tuple[int, Path]] = []
    if base.parent.is_dir():
        for candidate in base.parent.iterdir():
            match = pattern.fullmatch(candidate.name)
            if match and candidate.is_file():
                backups.append((int(match.group(1)), candidate))
    current = [base] if base.is_file() else []
    return current + [p for _, p in sorted(backups)]


def _records(file: Path, request_id: str) -> Iterator[AuditRecord]:
    with file.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if request_id not in line:  # skip parsing the (many) other requests
                continue
            try:
                record = AuditRecord.from_json(line)
            except (ValueError, TypeError) as err:
                logger.warning("%s:%d: skipping malformed audit record (%s)", file, number, err)
                continue
            if record.request_id == request_id:
                yield record


def find(path: str | Path, request_id: str) -> AuditRecord | None:
    """The record of ``request_id`` in the log at ``path`` or its rotated files, or None.

    Files are searched newest first and the last matching line of a file wins, so a
    request id that was reused resolves to its latest record.
    """
    for file in log_files(path):
        matches = list(_records(file, request_id))
        if matches:
            return matches[-1]
    return None
