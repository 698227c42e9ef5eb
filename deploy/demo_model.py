"""Build small random-weight demo checkpoints that the cluster can serve without a model hub.

Every preset shares one byte-level BPE tokenizer and one vocabulary size, because model tiers
cascade between presets and a token id must mean the same thing in all of them. The tokenizer is
trained on a deterministic built-in corpus so that its ``tokenizer.json`` is byte-identical across
runs, presets and machines.

Overwrite rule for ``out_dir``: it is built only if it does not exist, is an empty directory, or
holds the :data:`MARKER_FILE` of a previous demo build. Anything else is refused, so a typo in
``--out`` cannot delete a real checkpoint or unrelated data.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 2048
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
# BpeTrainer assigns special tokens the first ids, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
MARKER_FILE = "demo_model.json"
_ROUND_TRIP_SAMPLE = "Serve 8 experts: top-2 routing!\n\t{'a': [1, 2.5]} ~`@#$%^&*()_+|<>?=;"

# Typed as plain callables: the config classes' generated signatures reject mypy-checked kwargs.
_CONFIG_CLASSES: dict[str, Callable[..., transformers.PretrainedConfig]] = {
    "mixtral": transformers.MixtralConfig,
    "llama": transformers.LlamaConfig,
    "glm4_moe": transformers.Glm4MoeConfig,
    "deepseek_v2": transformers.DeepseekV2Config,
    "deepseek_v3": transformers.DeepseekV3Config,
    "gpt_oss": transformers.GptOssConfig,
}


@dataclass(frozen=True)
class DemoPreset:
    """A named model shape; ``params`` are kwargs for the family's config class (sizes, and
    where a family needs them its own settings, rope scaling included)."""

    description: str
    family: str
    params: Mapping[str, Any] = field(hash=False)

    def make_config(self) -> transformers.PretrainedConfig:
        """Config with the settings every preset must agree on (vocab, special ids, rope)."""
        kwargs: dict[str, Any] = dict(
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=4096,
            # transformers 5 folds rope_theta into rope_parameters; pass it explicitly because
            # Mixtral's default theta (1e6) differs from Llama's (1e4).
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            dtype="float32",
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        return _CONFIG_CLASSES[self.family](**{**kwargs, **self.params})


_ATTN = {"num_attention_heads": 8, "num_key_value_heads": 4}
PRESETS: dict[str, DemoPreset] = {
    "tiny": DemoPreset(
        "Mixtral-style MoE, 4 layers x 8 experts (top-2), hidden 256: builds in seconds",
        "mixtral",
        {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512, **_ATTN,
         "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "bench": DemoPreset(
        "Mixtral-style MoE, 8 layers x 16 experts (top-2), hidden 512: for benchmarks",
        "mixtral",
        {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1024, **_ATTN,
         "num_local_experts": 16, "num_experts_per_tok": 2},
    ),
    "fast": DemoPreset(
        "Dense Llama, 4 layers, hidden 256: a cheap draft/cascade tier",
        "llama",
        {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 688, **_ATTN},
    ),
    "glm4-moe": DemoPreset(
        "GLM-4.5-style MoE, 4 layers (1 dense) x 16 experts in 4 groups (top-4 of 2 groups), "
        "shared expert, q/k norm, half rotary, hidden 256",
        "glm4_moe",
        {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512, **_ATTN,
         "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
         "moe_intermediate_size": 256, "n_shared_experts": 1, "first_k_dense_replace": 1,
         "routed_scaling_factor": 2.5, "use_qk_norm": True, "attention_bias": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5}},
    ),
    "deepseek-v3": DemoPreset(
        "DeepSeek-V3-style MoE, 4 layers (1 dense) x 16 experts in 4 groups (top-4 of 2 "
        "groups), latent attention (q LoRA 128, kv LoRA 64), YaRN x4, hidden 256",
        "deepseek_v3",
        {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512,
         "num_attention_heads": 8, "num_key_value_heads": 8,
         "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
         "moe_intermediate_size": 256, "n_shared_experts": 1, "first_k_dense_replace": 1,
         "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
         "qk_rope_head_dim": 16, "v_head_dim": 32,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 1024, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    ),
    "deepseek-v2": DemoPreset(
        "DeepSeek-V2-style MoE, 4 layers (1 dense) x 16 experts in 8 groups (softmax gate, "
        "top-4 of 3 groups) + 2 shared, latent attention (full-rank q as in V2-Lite, kv LoRA "
        "64), YaRN x4, hidden 256",
        "deepseek_v2",
        {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512,
         "num_attention_heads": 8, "num_key_value_heads": 8,
         "n_routed_experts": 16, "num_experts_per_tok": 4, "topk_method": "group_limited_greedy",
         "n_group": 8, "topk_group": 3, "routed_scaling_factor": 2.0,
         "moe_intermediate_size": 256, "n_shared_experts": 2, "first_k_dense_replace": 1,
         "q_lora_rank": None, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
         "qk_rope_head_dim": 16, "v_head_dim": 32,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 1024, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
    ),
    "bench-deepseek-v3": DemoPreset(
        "DeepSeek-V3-shaped MoE for benchmarks: 8 layers (1 dense) x 32 experts in 8 groups "
        "(top-4 of 4 groups) + 1 shared, latent attention (q LoRA 192, kv LoRA 128), hidden 512",
        "deepseek_v3",
        {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1024,
         "num_attention_heads": 8, "num_key_value_heads": 8,
         "n_routed_experts": 32, "num_experts_per_tok": 4, "n_group": 8, "topk_group": 4,
         "moe_intermediate_size": 256, "n_shared_experts": 1, "first_k_dense_replace": 1,
         "q_lora_rank": 192, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
         "qk_rope_head_dim": 32, "v_head_dim": 64,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 1024, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    ),
    "gpt-oss": DemoPreset(
        "gpt-oss-style MoE, 4 layers alternating 128-token sliding and full attention, "
        "16 experts (top-4), attention sinks, clamped SwiGLU, YaRN x4, hidden 256",
        "gpt_oss",
        {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 256, **_ATTN,
         "head_dim": 32, "num_local_experts": 16, "num_experts_per_tok": 4,
         "sliding_window": 128,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                             "original_max_position_embeddings": 1024, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False}},
    ),
}  # fmt: skip


def _words(text: str) -> tuple[str, ...]:
    """Split a word list; ``_`` joins multi-word phrases."""
    return tuple(w.replace("_", " ") for w in text.split())


_SUBJECTS = _words(
    "the_router an_expert the_scheduler each_replica the_gateway a_worker the_cache our_cluster "
    "the_tokenizer a_small_model the_load_balancer every_request the_batcher a_GPU the_controller "
    "this_node the_planner the_autoscaler a_sidecar the_proxy the_allocator the_profiler "
    "the_compiler the_kernel a_shard the_leader a_follower the_dashboard the_operator the_engineer"
)
_VERBS = _words(
    "sends routes caches evicts balances streams batches schedules shards replicates measures "
    "compresses prefetches retries serves rejects admits drains pins unpins migrates copies "
    "quantises dequantises fuses splits merges throttles logs traces samples decodes encodes "
    "reorders pads truncates broadcasts gathers scatters reduces checkpoints restores warms "
    "validates hashes signs verifies allocates frees offloads uploads downloads polls watches"
)
_OBJECTS = _words(
    "tokens requests expert_weights hidden_states the_KV_cache attention_heads prompts logits "
    "gradients embeddings latency_budgets memory_pages activation_tensors routing_decisions "
    "model_shards safetensors_files config_files heartbeats leases health_checks rate_limits "
    "queues futures promises sockets streams buffers kernels matrices vectors bitmaps indices "
    "histograms counters metrics spans traces snapshots manifests checksums certificates "
    "priorities deadlines quotas budgets replicas partitions segments blocks pages slots "
    "sequences vocabularies merges byte_pairs layer_norms residuals projections rotary_angles"
)
_ADJECTIVES = _words(
    "sparse dense fast slow idle busy remote local hot cold large small quantised stale fresh "
    "overloaded healthy degraded warm pinned pageable contiguous fragmented sharded replicated "
    "deterministic stochastic greedy speculative batched streaming asynchronous synchronous "
    "redundant critical optional expensive cheap noisy quiet elastic static dynamic adaptive"
)
_PLACES = _words(
    "across_the_cluster to_the_least_loaded_expert within_a_millisecond on_every_step "
    "before_the_deadline in_parallel over_gRPC under_heavy_load at_startup after_a_failure "
    "between_layers per_token in_the_background on_the_CPU over_HTTP through_the_gateway "
    "during_prefill during_decode on_the_next_tick inside_the_kernel behind_a_feature_flag"
)
_ADVERBS = _words(
    "quickly slowly carefully eagerly lazily rarely often always never usually barely safely "
    "optimistically pessimistically transparently gracefully aggressively silently loudly"
)
_CONNECTIVES = _words("because while so_that although when unless after before since until")
_NAMES = _words("Ada Alan Grace Linus Barbara Edsger Donald Margaret Ken Dennis Radia Frances")


def _sentence(rng: random.Random) -> str:
    """One varied English sentence; the mix covers capitals, digits, code and punctuation."""
    pick = rng.choice
    words = (_SUBJECTS, _ADVERBS, _VERBS, _ADJECTIVES, _OBJECTS, _PLACES)
    clause = " ".join(pick(options) for options in words)
    kind = rng.randrange(8)
    if kind == 0:
        clause += f", {pick(_CONNECTIVES)} {pick(_SUBJECTS)} is {pick(_ADJECTIVES)}"
    elif kind == 1:
        clause += f" with {rng.randint(1, 512)} experts and top-{rng.randint(1, 8)} routing"
    elif kind == 2:
        clause += f" ({rng.randint(2, 99)}% of the time, p99 {rng.uniform(0.1, 90):.2f} ms)"
    elif kind == 3:
        clause = f"is it true that {clause}?"
    elif kind == 4:
        clause = f'"{clause[0].upper()}{clause[1:]}," said {pick(_NAMES)}'
    elif kind == 5:
        key = f"layers.{rng.randrange(48)}.mlp.experts.{rng.randrange(64)}.w{rng.randint(1, 3)}"
        clause += f"; see `{key}` in shard {rng.randrange(1, 9):05d}-of-00008"
    elif kind == 6:
        clause = f"{pick(_NAMES)} asked whether {clause} ({rng.randrange(16**8):08x})"
    end = "" if clause.endswith("?") else rng.choice((".", ".", ".", "!", ";"))
    return clause[0].upper() + clause[1:] + end


def demo_corpus(n_sentences: int = 5000) -> list[str]:
    """Deterministic training text (a few hundred KB), grouped into short paragraphs."""
    rng = random.Random(0)
    sentences = [_sentence(rng) for _ in range(n_sentences)]
    return [" ".join(sentences[i : i + 5]) + "\n" for i in range(0, len(sentences), 5)]


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train once per process; cached as JSON so callers get a fresh, unshared object."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus(), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [BOS_ID, EOS_ID, PAD_ID] or tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"unexpected tokenizer layout: special ids {ids}")
    decoded = tok.decode(tok.encode(_ROUND_TRIP_SAMPLE).ids)
    if decoded != _ROUND_TRIP_SAMPLE:
        raise RuntimeError(f"tokenizer does not round-trip ASCII: {decoded!r}")
    return str(tok.to_str())


def demo_tokenizer() -> Tokenizer:
    """The shared demo tokenizer (trained on first use)."""
    return Tokenizer.from_str(_trained_tokenizer_json())


def is_demo_model(path: Path) -> bool:
    """True if ``path`` is a directory written by :func:`build_demo_model`."""
    return (path / MARKER_FILE).is_file()


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists and is not a directory; refusing to replace it")
    if any(out_dir.iterdir()) and not is_demo_model(out_dir):
        raise FileExistsError(
            f"{out_dir} is not empty and has no {MARKER_FILE}, so it is not a previous demo "
            "build; refusing to overwrite it (choose another --out or remove it yourself)"
        )


def _swap_into_place(staged: Path, out_dir: Path) -> None:
    """Rename the finished build over ``out_dir``; the old copy is deleted only afterwards."""
    if not out_dir.exists():
        os.rename(staged, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    try:
        os.rename(staged, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _write_checkpoint(
    staged: Path, name: str, preset: DemoPreset, seed: int, say: Callable[[str], None]
) -> None:
    say("training tokenizer")
    tok = demo_tokenizer()
    cfg = preset.make_config()
    with torch.device("meta"):  # counts parameters without allocating or consuming RNG
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in skeleton.parameters())
    say(f"initialising weights ({n_params / 1e6:.1f}M params)")
    # fork_rng keeps the caller's global RNG stream untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    say("writing safetensors")
    model.save_pretrained(staged, safe_serialization=True)
    wrapper = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=cfg.max_position_embeddings,
    )
    wrapper.save_pretrained(staged)
    # transformers 5 records its own class name ("TokenizersBackend"), which 4.x cannot resolve;
    # the 4.x name still loads in 5.x, so write that one.
    tok_cfg_path = staged / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    for path in staged.iterdir():
        path.chmod(0o644)  # save_pretrained leaves the weights 0600; serving workers may differ
    # Written last: a directory without it is never mistaken for a finished build.
    marker = {"builder": "moe-cluster demo-model", "preset": name, "seed": seed}
    (staged / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def build_demo_model(
    out_dir: Path,
    preset: str = "tiny",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build preset ``preset`` into ``out_dir`` and return its resolved path.

    The checkpoint is staged in a hidden sibling directory and renamed into place, so a crash
    never leaves ``out_dir`` looking complete. The same seed gives byte-identical weights.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    say: Callable[[str], None] = progress or (lambda _msg: None)
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    staged.chmod(0o755)  # mkdtemp's 0700 would otherwise survive the rename
    try:
        _write_checkpoint(staged, preset, PRESETS[preset], seed, say)
        _check_replaceable(out_dir)  # re-check: someone may have written there meanwhile
        _swap_into_place(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    say(f"done: {out_dir} ({_dir_size_mb(out_dir):.1f} MB)")
    return out_dir
