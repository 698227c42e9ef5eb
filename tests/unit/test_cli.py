"""The moe-cluster command line, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.cli import build_parser, main
from tests.checkpoints import build_family_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["demo-model", "--out", str(out), "--preset", "tiny", "--seed", "3"]) == 0
    return out


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("command", [[], ["demo-model"], ["generate"]])
def test_help_on_every_subcommand(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    assert "usage: moe-cluster" in capsys.readouterr().out


def test_generate_streams_text(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(demo), "--prompt", "The experts", "--max-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip(), "no text was streamed"
    assert "1 prompt(s)" in captured.err and "tokens/s" in captured.err


def test_generate_json_from_token_ids(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(demo), "--token-ids", "5,6,7,8", "--max-tokens", "6"]
    assert main([*args, "--ignore-eos", "--json"]) == 0
    (record,) = _json_lines(capsys.readouterr().out)
    assert isinstance(record["token_ids"], list) and len(record["token_ids"]) == 6
    assert record["finish_reason"] == "length" and isinstance(record["text"], str)


def test_prompts_file_keeps_order_and_per_line_fields(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        {"prompt": "Ray serves experts", "max_tokens": 3},
        {"token_ids": [9, 10, 11]},
        {"prompt": "a tiny model", "temperature": 0.9, "seed": 4, "top_k": 20},
    ]
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    base = ["generate", "--model", str(demo), "--max-tokens", "5", "--ignore-eos", "--json"]
    assert main([*base, "--prompts-file", str(file)]) == 0
    records = _json_lines(capsys.readouterr().out)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [len(r["token_ids"]) for r in records] == [3, 5, 5]  # type: ignore[arg-type]
    # each line gives what the same request gives alone
    assert main([*base, "--token-ids", "9,10,11"]) == 0
    (alone,) = _json_lines(capsys.readouterr().out)
    assert alone["token_ids"] == records[1]["token_ids"]
    assert main([*base, "--prompt", "a tiny model", "--temperature", "0.9", "--seed", "4",
                 "--top-k", "20"]) == 0  # fmt: skip
    (alone,) = _json_lines(capsys.readouterr().out)
    assert alone["token_ids"] == records[2]["token_ids"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "x"}\n{oops\n', ":2: not valid JSON"),
        ('{"prompt": "x", "colour": 1}\n', "unknown field(s) ['colour']"),
        ('{"max_tokens": 3}\n', "exactly one of 'prompt' or 'token_ids'"),
        ('{"token_ids": [1], "top_p": 2}\n', "top_p=2 is out of range"),
        ("\n", "no prompts in the file"),
    ],
)
def test_bad_prompts_file(
    demo: Path, tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_text(content)
    assert main(["generate", "--model", str(demo), "--prompts-file", str(file)]) == 2
    assert message in capsys.readouterr().err


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "none"), "--token-ids", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    no_tokenizer = build_family_checkpoint("llama", tmp_path / "llama", seed=0)
    assert main(["generate", "--model", str(no_tokenizer), "--prompt", "hello"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(no_tokenizer), "--token-ids", "1,x"]) == 2
    assert "comma-separated list of integers" in capsys.readouterr().err
    assert main(["demo-model", "--out", str(tmp_path / "d"), "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "huge" in err and "tiny" in err and "bench" in err and "fast" in err
