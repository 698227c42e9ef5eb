"""A gRPC client for the ``moecluster.v1`` API, used by ``moe-cluster generate --server``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from deploy.prompts import PromptRequest
from deploy.proto import moecluster_v1_pb2 as pb
from deploy.proto import moecluster_v1_pb2_grpc as pb_grpc


@dataclass
class ClientOptions:
    tier: str = ""
    api_key: str | None = None
    timeout: float | None = None
    session_id: str = ""
    stop: tuple[str, ...] = ()
    retrieval_confidence: float | None = None


@dataclass
class RemoteResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    last: pb.GenerateChunk | None = None

    def as_json(self, index: int) -> dict[str, Any]:
        record: dict[str, Any] = {
            "index": index,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }
        if self.last is not None:
            usage, tier = self.last.usage, self.last.tier
            record["prompt_tokens"] = usage.prompt_tokens
            record["cached_prompt_tokens"] = usage.cached_prompt_tokens
            record["tier"] = tier.name
            record["tier_reason"] = tier.reason
            if tier.HasField("confidence"):
                record["confidence"] = round(tier.confidence, 4)
            record["request_id"] = self.last.request_id
            record["trace_id"] = self.last.trace_id
        return record


def build_request(prompt: PromptRequest, options: ClientOptions) -> pb.GenerateRequest:
    p = prompt.params
    request = pb.GenerateRequest(
        prompt=prompt.text or "",
        token_ids=list(prompt.token_ids or ()),
        tier=options.tier,
        max_tokens=p.max_tokens,
        top_k=p.top_k,
        stop=list(options.stop),
        ignore_eos=p.ignore_eos,
        session_id=options.session_id,
    )
    if p.temperature:
        request.temperature = p.temperature
    if p.top_p != 1.0:
        request.top_p = p.top_p
    if p.seed is not None:
        request.seed = p.seed
    if options.retrieval_confidence is not None:
        request.retrieval_confidence = options.retrieval_confidence
    return request


class MoEClusterClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.MoEClusterStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def stream(
        self, request: pb.GenerateRequest, options: ClientOptions
    ) -> Iterator[pb.GenerateChunk]:
        metadata = [("authorization", f"Bearer {options.api_key}")] if options.api_key else []
        yield from self.stub.Generate(request, metadata=metadata, timeout=options.timeout)

    def generate(
        self, prompt: PromptRequest, options: ClientOptions, out: TextIO | None = None
    ) -> RemoteResult:
        """Run one prompt to the end, writing text deltas to ``out`` as they arrive."""
        result = RemoteResult()
        for chunk in self.stream(build_request(prompt, options), options):
            result.token_ids.extend(chunk.token_ids)
            result.text += chunk.text
            if out is not None:
                out.write(chunk.text or "".join(f"{t} " for t in chunk.token_ids))
                out.flush()
            if chunk.finish_reason:
                result.finish_reason = chunk.finish_reason
                result.last = chunk
        return result


def run_prompts(
    address: str,
    prompts: Sequence[PromptRequest],
    options: ClientOptions,
    as_json: bool,
    concurrency: int = 8,
) -> int:
    """Send every prompt (concurrently), print results in input order; 2 on a gRPC error."""
    client = MoEClusterClient(address)
    stream_out = sys.stdout if len(prompts) == 1 and not as_json else None
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(prompts)))) as pool:
            futures = [pool.submit(client.generate, p, options, stream_out) for p in prompts]
            for index, future in enumerate(futures):
                result = future.result()
                if as_json:
                    print(json.dumps(result.as_json(index)), flush=True)
                elif stream_out is None:
                    print(f"--- [{index}] {result.finish_reason}, {len(result.token_ids)} tokens")
                    print(result.text or " ".join(map(str, result.token_ids)))
        if stream_out is not None:
            print()
            if result.last is not None:
                tier = result.last.tier
                print(
                    f"[generate] tier {tier.name} ({tier.reason}), "
                    f"{result.last.usage.completion_tokens} tokens, finish={result.finish_reason}",
                    file=sys.stderr,
                )
    except grpc.RpcError as err:
        code = err.code()
        details = err.details()
        print(f"moe-cluster generate: {code.name}: {details}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0
