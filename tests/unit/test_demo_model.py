"""The demo checkpoint builder: shapes, a shared tokenizer, determinism and safe overwrites."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers
import transformers

from deploy import demo_model
from deploy.demo_model import MARKER_FILE, PRESETS, build_demo_model

TEXT = "The router sends 17 tokens to expert #3, then waits 2.5 ms!\n\tDone? {ok: true}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    return {name: build_demo_model(root / name, name, seed=0) for name in ("tiny", "fast")}


def _weights(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_tiny_is_a_small_mixtral(built: dict[str, Path]) -> None:
    cfg = transformers.AutoConfig.from_pretrained(built["tiny"])
    assert cfg.model_type == "mixtral"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (256, 4, 512)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 4)
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.tie_word_embeddings is False


def test_fast_is_a_dense_llama(built: dict[str, Path]) -> None:
    cfg = transformers.AutoConfig.from_pretrained(built["fast"])
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (256, 4, 688)
    assert not hasattr(cfg, "num_local_experts")


@pytest.mark.parametrize("name", ["tiny", "fast"])
def test_shared_vocab_and_special_ids(built: dict[str, Path], name: str) -> None:
    cfg = transformers.AutoConfig.from_pretrained(built[name])
    assert cfg.vocab_size == demo_model.VOCAB_SIZE == 2048
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    assert (built[name] / MARKER_FILE).is_file()


def test_presets_share_a_byte_identical_tokenizer(built: dict[str, Path]) -> None:
    assert (built["tiny"] / "tokenizer.json").read_bytes() == (
        built["fast"] / "tokenizer.json"
    ).read_bytes()


def test_auto_tokenizer_round_trips(built: dict[str, Path]) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(built["tiny"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert len(tok) == 2048
    ids = tok.encode(TEXT)
    assert all(0 <= i < 2048 for i in ids)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT) / 2, "BPE merges should compress English text"


def test_raw_tokenizer_file_round_trips(built: dict[str, Path]) -> None:
    tok = tokenizers.Tokenizer.from_file(str(built["fast"] / "tokenizer.json"))
    every_ascii = "".join(chr(c) for c in range(32, 127)) + "\n\t"
    assert tok.decode(tok.encode(every_ascii).ids) == every_ascii
    assert tok.decode(tok.encode(TEXT).ids) == TEXT


def test_same_seed_same_bytes_other_seed_differs(built: dict[str, Path], tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again", "fast", seed=0)
    other = build_demo_model(tmp_path / "other", "fast", seed=1)
    assert _weights(again) == _weights(built["fast"])
    assert _weights(other) != _weights(built["fast"])


def test_unknown_preset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="huge") as err:
        build_demo_model(tmp_path / "x", "huge")
    assert all(name in str(err.value) for name in PRESETS)
    assert not (tmp_path / "x").exists()


def test_progress_reports_steps(tmp_path: Path) -> None:
    steps: list[str] = []
    build_demo_model(tmp_path / "m", "fast", progress=steps.append)
    assert steps[0] == "training tokenizer"
    assert any(s.startswith("initialising weights (") and "params" in s for s in steps)
    assert "writing safetensors" in steps
    assert steps[-1].startswith("done: ") and steps[-1].endswith(" MB)")


def test_refuses_to_clobber_a_non_demo_directory(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        build_demo_model(target, "fast")
    assert (target / "notes.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


def test_refuses_a_file_path(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError):
        build_demo_model(target, "fast")


def test_fills_an_empty_dir_and_replaces_a_previous_build(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    build_demo_model(target, "fast", seed=0)
    first = _weights(target)
    build_demo_model(target, "fast", seed=1)
    assert _weights(target) != first
    assert _leftovers(tmp_path) == []


def test_a_crash_leaves_no_complete_looking_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    previous = build_demo_model(tmp_path / "old", "fast", seed=0)
    old_weights = _weights(previous)
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", boom)
    for target in (tmp_path / "new", previous):
        with pytest.raises(RuntimeError, match="disk on fire"):
            build_demo_model(target, "fast", seed=1)
    assert not (tmp_path / "new").exists()
    assert _weights(previous) == old_weights, "a failed rebuild must keep the old build"
    assert _leftovers(tmp_path) == []
