"""The ``moe-cluster`` command line.

Subcommands:
  demo-model  build a small random checkpoint (with tokenizer) to try the system on
  generate    run prompts through a model in-process (no Ray) and print the tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.prompts import read_prompts_file, request_from_flags
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
        help="tiny (Mixtral, 4 layers, 8 experts), bench (Mixtral, 8 layers, 16 experts) "
        "or fast (dense Llama); default tiny",
    )
    demo.add_argument("--seed", type=int, default=0, help="weight seed (0)")

    gen = sub.add_parser(
        "generate",
        help="generate from prompts in-process",
        description="Run prompts through a checkpoint in this process (no Ray) and print the "
        "generated tokens, streaming when there is one prompt.",
    )
    gen.add_argument("--model", required=True, type=Path, help="checkpoint directory")
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
    gen.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    return parser


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from deploy.demo_model import build_demo_model

    def progress(msg: str) -> None:
        print(f"[demo-model] {msg}", file=sys.stderr, flush=True)

    build_demo_model(args.out, preset=args.preset, seed=args.seed, progress=progress)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from cluster.generator import generate
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
        print()
    print(
        f"[generate] {len(results)} prompt(s), {total} tokens in {elapsed:.2f}s "
        f"({total / max(elapsed, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"demo-model": _cmd_demo_model, "generate": _cmd_generate}
    try:
        return handlers[args.command](args)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"moe-cluster {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
