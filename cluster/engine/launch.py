"""How an engine is built: one recipe (``EngineLaunch``), one place that follows it.

Both transports build their engine with ``build_engine``, in the process that will step
it: a child process receives the launch over its socket (so the recipe is picklable and
carries an expert backend *factory*, never a live backend), the in-process transport calls
it directly (``AsyncEngine.start``). Importing this module loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.engine.config import EngineConfig
from cluster.engine.config_pins import pin_config_prefixes

if TYPE_CHECKING:
    from cluster.engine.llm_engine import LLMEngine
    from cluster.kv_store.config import KVStoreConfig
    from cluster.kv_store.relay import StoreFactory
    from experts.backend import ExpertBackend, ExpertBackendFactory


@dataclass(frozen=True)
class EngineKVLaunch:
    """The engine's KV link: events always, the cluster store when ``store`` is set (a
    recipe built where the engine runs, like the experts')."""

    config: KVStoreConfig
    store: StoreFactory | None = None


@dataclass(frozen=True)
class EngineLaunch:
    """What a process needs to build the engine."""

    model_dir: str
    config: EngineConfig
    device: str = "cpu"
    torch_threads: int | None = None  # None: torch's default in that process
    count_routing: bool = False  # keep per-(layer, expert) counts for the metrics
    # where the experts live when not with the backbone (a shard pool); built where it runs
    experts: ExpertBackendFactory | None = None
    kv: EngineKVLaunch | None = None  # KV events and the cluster store; None: neither


def build_engine(launch: EngineLaunch, experts: ExpertBackend | None = None) -> LLMEngine:
    """Load the checkpoint and its tokenizer, build the experts from their factory (or take
    ``experts``, a live backend: in-process only), and make the engine, counting routing
    when asked (and the model has experts to count)."""
    import torch

    from cluster.engine.llm_engine import LLMEngine
    from experts.model import MoEModel
    from experts.tokenizer import load_tokenizer

    if launch.torch_threads is not None:
        torch.set_num_threads(launch.torch_threads)
    assert experts is None or launch.experts is None, "a live backend and a factory"
    if launch.experts is not None:
        experts = launch.experts.build()
    model = MoEModel.from_checkpoint(launch.model_dir, device=launch.device, experts=experts)
    engine = LLMEngine(model, launch.config, load_tokenizer(launch.model_dir))
    engine.runner.count_routing = launch.count_routing and model.spec.is_moe
    if launch.kv is not None:
        from cache.block_key import model_fingerprint

        store = launch.kv.store.build() if launch.kv.store is not None else None
        model_id = f"{model_fingerprint(launch.model_dir)}:{model.spec.kv_layout}"
        engine.attach_kv(model_id, store, launch.kv.config)
    pin_config_prefixes(engine)  # tiers[].engine.pinned_prefixes: computed and pinned first
    return engine
