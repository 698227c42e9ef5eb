"""The ``moe-cluster`` command line.

Subcommands:
  demo-model  build a small random checkpoint (with tokenizer) to try the system on
  generate    run prompts in-process (--model) or through a cluster over gRPC (--server)
  up          deploy the Serve application on Ray and serve gRPC until stopped
  replay      re-run a request from the audit log on a cluster and compare the tokens
  traces      report latency, expert fan-out and hot experts from JSON-lines trace files
  plan        place experts on shards from a load matrix (replicas, packing, moves)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.plan_cli import add_plan_parser, cmd_plan
from deploy.prompts import read_prompts_file, request_from_flags
from deploy.replay import add_replay_parser, cmd_replay
from deploy.traces_report import add_traces_parser, cmd_traces
from experts.spec import CheckpointError


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (64)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default), up to 100"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (1)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-cluster", description="Serve mixture-of-experts language models on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo-model",
        help="build a small random checkpoint with a tokenizer",
        description="Write a Hugging Face checkpoint with random weights and a byte-level BPE "
        "tokenizer, built locally (nothing is downloaded).",
    )
    demo.add_argument("--out", required=True, type=Path, help="directory to write")
    demo.add_argument(
        "--preset",
        default="tiny",
        help="tiny (Mixtral, 4 layers, 8 experts), bench (Mixtral, 8 layers, 16 experts), "
        "fast (dense Llama), glm4-moe, deepseek-v2, deepseek-v3, bench-deepseek-v3 or gpt-oss "
        "(small checkpoints of those families); default tiny",
    )
    demo.add_argument("--seed", type=int, default=0, help="weight seed (0)")

    gen = sub.add_parser(
        "generate",
        help="generate from prompts, in-process or over gRPC",
        description="Run prompts through a checkpoint in this process (--model, no Ray) or "
        "through a running cluster (--server HOST:PORT) and print the generated tokens, "
        "streaming when there is one prompt.",
    )
    target = gen.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="checkpoint directory (in-process)")
    target.add_argument("--server", help="gRPC address of a cluster, e.g. 127.0.0.1:9000")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    source.add_argument("--token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    source.add_argument(
        "--prompts-file",
        type=Path,
        help="JSON lines: {prompt | token_ids, max_tokens, temperature, top_p, top_k, seed, "
        "ignore_eos}; flags give the defaults",
    )
    _add_sampling_flags(gen)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, in order")
    gen.add_argument("--device", default="cpu", help="torch device with --model (cpu, cuda:N)")
    remote = gen.add_argument_group("with --server")
    remote.add_argument("--tier", default="", help="tier to use (default: the policy decides)")
    remote.add_argument(
        "--api-key",
        default=os.environ.get("MOE_CLUSTER_API_KEY"),
        help="API key (default: $MOE_CLUSTER_API_KEY)",
    )
    remote.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    remote.add_argument("--session-id", default="", help="conversation id, for cache affinity")
    remote.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    remote.add_argument(
        "--retrieval-confidence", type=float, default=None, help="caller's retrieval score, [0, 1]"
    )

    up = sub.add_parser(
        "up",
        help="serve the cluster over gRPC",
        description="Start a local Ray instance (or join one with --address), deploy the Serve "
        "application and serve gRPC until Ctrl-C. With no --config the demo tiers are served, "
        "their models built if missing.",
    )
    up.add_argument("--config", type=Path, default=None, help="cluster config YAML")
    up.add_argument("--address", default=None, help="Ray cluster address (default: start one)")
    up.add_argument("--num-cpus", type=float, default=None, help="CPUs for a local Ray instance")
    up.add_argument(
        "--demo-dir", type=Path, default=Path(".demo-models"), help="where demo models live"
    )
    up.add_argument("--sample", default=None, help="stream this prompt through gRPC once ready")
    up.add_argument("--verbose", action="store_true", help="show Ray and Serve logs here")
    add_replay_parser(sub)
    add_traces_parser(sub)
    add_plan_parser(sub)
    return parser


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from deploy.demo_model import build_demo_model

    def progress(msg: str) -> None:
        print(f"[demo-model] {msg}", file=sys.stderr, flush=True)

    build_demo_model(args.out, preset=args.preset, seed=args.seed, progress=progress)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from deploy.up import serve_forever

    def sample(address: str) -> None:
        from deploy.client import ClientOptions, run_prompts
        from deploy.prompts import PromptRequest
        from experts.sampling_params import SamplingParams

        print(f"[up] sample: {args.sample!r}", file=sys.stderr, flush=True)
        prompt = PromptRequest(SamplingParams(max_tokens=48), text=args.sample)
        run_prompts(address, [prompt], ClientOptions(timeout=120), as_json=False)

    return serve_forever(
        args.config,
        args.address,
        args.num_cpus,
        demo_dir=args.demo_dir,
        sample=sample if args.sample else None,
        verbose=args.verbose,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.server is not None:
        return _generate_remote(args)
    from cluster.engine.generator import generate
    from experts.model import MoEModel
    from experts.tokenizer import IncrementalDetokenizer, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    if args.prompts_file is not None:
        requests = read_prompts_file(args.prompts_file, args)
    else:
        requests = [request_from_flags(args)]
    prompts = [r.resolve_ids(tokenizer) for r in requests]
    model = MoEModel.from_checkpoint(args.model, device=args.device)
    stream = len(requests) == 1 and not args.json
    detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None and stream else None

    def on_token(index: int, token: int) -> None:
        if not stream:
            return
        piece = detok.push(token) if detok is not None else f"{token} "
        sys.stdout.write(piece)
        sys.stdout.flush()

    start = time.perf_counter()
    results = generate(model, prompts, [r.params for r in requests], on_token=on_token)
    elapsed = time.perf_counter() - start
    total = sum(len(r.token_ids) for r in results)
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        text = tokenizer.decode(res.token_ids) if tokenizer is not None else None
        if args.json:
            record = {
                "index": i,
                "prompt_tokens": len(prompt),
                "token_ids": res.token_ids,
                "finish_reason": res.finish_reason,
            }
            if text is not None:
                record["text"] = text
            print(json.dumps(record), flush=True)
        elif not stream:
            shown = text if text is not None else " ".join(map(str, res.token_ids))
            print(f"--- [{i}] {res.finish_reason}, {len(res.token_ids)} tokens\n{shown}")
    if stream:
        print(detok.flush() if detok is not None else "")
    print(
        f"[generate] {len(results)} prompt(s), {total} tokens in {elapsed:.2f}s "
        f"({total / max(elapsed, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    from deploy.client import ClientOptions, run_prompts

    if args.prompts_file is not None:
        requests = read_prompts_file(args.prompts_file, args)
    else:
        requests = [request_from_flags(args)]
    options = ClientOptions(
        tier=args.tier,
        api_key=args.api_key,
        timeout=args.timeout,
        session_id=args.session_id,
        stop=tuple(args.stop),
        retrieval_confidence=args.retrieval_confidence,
    )
    return run_prompts(args.server, requests, options, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "demo-model": _cmd_demo_model,
        "generate": _cmd_generate,
        "up": _cmd_up,
        "replay": cmd_replay,
        "traces": cmd_traces,
        "plan": cmd_plan,
    }
    try:
        return handlers[args.command](args)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"moe-cluster {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
