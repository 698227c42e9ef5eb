"""Fuzz every ``GenerateRequest`` field against the real front door, gateway and engines.

The whole stack runs in this process, on one event loop in a background thread kept for the
module: the gRPC front door (``deploy/front_door.py``) on loopback, the real ``Gateway`` with
an API key and the fast -> strong cascade on, and one ``TierReplica`` per tier with its engine
in-process (a dense ``fast`` demo model and the MoE ``tiny`` one, sharing a tokenizer), each
with a KV pool small enough that a request can be refused for never fitting it.

Hypothesis draws a ``Case``: every field of the request, its metadata (API key, traceparent,
request id), the client's deadline and how many chunks to read before cancelling. Each field
is drawn "tame" (mostly accepted values, extremes included: 1e-45 is a valid temperature) or,
for the few fields a case picks, "wild" (the field's whole wire domain: NaN, inf, subnormals,
uint32/uint64 extremes, odd unicode, sizes past every limit), so that about half the cases
reach an engine while every field's wild values are still covered. Long values are kept as
descriptions (``Repeated``, ``RandomIds``, ...) so that a failing case prints short.

Oracle, per case: the call ends OK (or cancelled by the test after its chunks) or with
INVALID_ARGUMENT, RESOURCE_EXHAUSTED or UNAUTHENTICATED (DEADLINE_EXCEEDED only under a tiny
deadline the case chose), whose details are short, hold no traceback and no 64-character
piece of the prompt, a stop string or the session id; a plainly invalid request (per the
proto's documented ranges) is INVALID_ARGUMENT, a missing or wrong key UNAUTHENTICATED, an
oversized message RESOURCE_EXHAUSTED. After every case, once the gateway has ended its calls,
both engines must be alive and settle to no KV block held and nothing running or waiting;
every ``CANARY_EVERY`` cases a fixed greedy request runs alongside the case and must give the
tokens recorded at start.

Prompts of 1 MiB + 1, 2 and 5 MB (refused by size at the gateway and at the message limit)
and one just under the edge's 1 MiB (refused by the replica's context bound, untokenized)
are in.

The cases, strategies, oracle and stack are in ``tests/unit/fuzz/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from deploy.config import parse_config
from deploy.demo_model import build_demo_model
from tests.listening_sockets import free_port
from tests.unit.fuzz.cases import (
    CALL_TIMEOUT_S,
    CANARY_EVERY,
    CASCADE,
    KEY,
    NUM_BLOCKS,
    NUM_CASES,
    UINT32,
    Case,
    ManyStops,
    RandomIds,
    Repeated,
)
from tests.unit.fuzz.stack import Stack
from tests.unit.fuzz.strategies import cases


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fuzz")
    models = {
        "fast": build_demo_model(root / "fast", "fast"),
        "strong": build_demo_model(root / "tiny", "tiny"),
    }
    engine = {"num_blocks": NUM_BLOCKS}
    config = parse_config(
        {
            "grpc": {"port": free_port()},
            "auth": {"api_keys": [KEY], "api_keys_env": None},
            "tiers": [{"name": n, "model": str(m), "engine": engine} for n, m in models.items()],
            "policy": {"cascade": CASCADE},
        },
        base_dir=root,
    )
    built = Stack(config)
    yield built
    built.close()


# --- the tests ---------------------------------------------------------------------------------


def _case(**changes: Any) -> Case:
    """A tame accepted case with ``changes``: the issue's reproductions, as explicit examples."""
    base: dict[str, Any] = {f.name: None for f in fields(Case)} | {
        "prompt": "",
        "token_ids": [5, 6, 7, 8],
        "tier": "",
        "max_tokens": 8,
        "top_k": 0,
        "stop": [],
        "stop_token_ids": [],
        "ignore_eos": True,
        "session_id": "",
        "kv_kind": "",
        "kv_window": 0,
        "kv_sinks": 0,
        "kv_anchors": [],
        "return_routing": False,
        "attention_first_tokens": 0,
        "auth": "key",
        "timeout_s": CALL_TIMEOUT_S,
        "read_chunks": 6,
    }
    return Case(**(base | changes))


def test_every_generate_request_field_gets_a_clear_answer_and_the_tiers_stay_healthy(
    stack: Stack,
) -> None:
    before = stack.num_cases

    @example(_case(temperature=1e-45, tier="fast"))
    @example(_case(temperature=1e-38, tier="strong"))
    @example(_case(temperature=1e-45, top_k=1, top_p=1e-45))
    @example(_case(token_ids=RandomIds(200_000, 0, 2047, 0), kv_kind="window", kv_window=64))
    @example(
        _case(
            token_ids=RandomIds(4000, 0, 2047, 1),
            tier="strong",
            kv_kind="window",
            kv_window=64,
            max_tokens=4000,
            read_chunks=2,
        )
    )
    @example(_case(kv_kind="window", kv_window=2048, kv_anchors=[(i, i + 1) for i in range(64)]))
    @example(_case(kv_kind="window", kv_window=64, kv_sinks=UINT32))
    @example(_case(kv_kind="window", kv_window=64, kv_anchors=[(0, UINT32)] * 64))
    @example(_case(stop=ManyStops("s", 100_000)))
    @example(_case(stop_token_ids=RandomIds(2_000_000, 0, 2047, 0)))
    @example(_case(prompt=Repeated("x", 5 * 2**20), token_ids=[]))
    @given(case=cases())
    @settings(
        max_examples=NUM_CASES,
        deadline=None,
        derandomize=True,
        database=None,
        # no explain phase: the lines it finds "only run by failing cases" are the replicas'
        # replacement after a failure
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    def fuzz(case: Case) -> None:
        stack.fuzz(case)

    fuzz()
    assert stack.num_cases - before >= NUM_CASES
    assert stack.num_canaries >= NUM_CASES // CANARY_EVERY
    assert stack.run(stack.canary()) == stack.canary_tokens
    assert not stack.settle()
    assert stack.num_restarts == 0
