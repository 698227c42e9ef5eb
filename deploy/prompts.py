"""Prompt requests from command-line flags or a JSON-lines prompts file."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from experts.sampling_params import SamplingParams

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")
_FIELDS = {"prompt", "token_ids", *_SAMPLING_FIELDS}


@dataclass(frozen=True)
class PromptRequest:
    """A prompt (text or ids) and its sampling settings."""

    params: SamplingParams
    text: str | None = None
    token_ids: tuple[int, ...] | None = None

    def resolve_ids(self, tokenizer: Tokenizer | None) -> list[int]:
        if self.token_ids is not None:
            return list(self.token_ids)
        assert self.text is not None
        if tokenizer is None:
            raise ValueError(
                "this checkpoint has no tokenizer.json, so text prompts cannot be encoded; "
                "pass token ids instead (--token-ids 1,2,3 or token_ids in the prompts file)"
            )
        return list(tokenizer.encode(self.text).ids)


def parse_token_ids(raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--token-ids {raw!r} is not a comma-separated list of integers") from None


def _params(values: dict[str, Any], where: str) -> SamplingParams:
    try:
        return SamplingParams(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _flag_defaults(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _SAMPLING_FIELDS}


def request_from_flags(args: argparse.Namespace) -> PromptRequest:
    params = _params(_flag_defaults(args), "flags")
    if args.token_ids is not None:
        return PromptRequest(params, token_ids=parse_token_ids(args.token_ids))
    return PromptRequest(params, text=args.prompt)


def read_prompts_file(path: Path, args: argparse.Namespace) -> list[PromptRequest]:
    """One JSON object per line; blank lines are skipped; flags give missing fields."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    requests = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
        if ("prompt" in obj) == ("token_ids" in obj):
            raise ValueError(f"{where}: give exactly one of 'prompt' or 'token_ids'")
        values = _flag_defaults(args) | {k: obj[k] for k in _SAMPLING_FIELDS if k in obj}
        params = _params(values, where)
        if "token_ids" in obj:
            ids = obj["token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError(f"{where}: 'token_ids' must be a list of integers")
            requests.append(PromptRequest(params, token_ids=tuple(ids)))
        else:
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"{where}: 'prompt' must be a string")
            requests.append(PromptRequest(params, text=obj["prompt"]))
    if not requests:
        raise ValueError(f"{path}: no prompts in the file")
    return requests
