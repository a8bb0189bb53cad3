"""Fixtures: tiny Mixtral checkpoints built and saved by `transformers`, and stores from them;
and `memory_model`, a random model over in-memory experts, for tests that need no store."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

from mer.store.convert import convert
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache(tmp_path_factory):
    """Kernel choices made afresh under the session's temp dir for fixtures of every scope
    too: a module's server starts before any function-scoped fixture, and it had read the
    user's cache (choices an older mer had made there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mer-cache"))
        yield


@pytest.fixture(autouse=True)
def _isolated():
    """The same random draws whatever ran before (caches: `_kernel_cache`)."""
    torch.manual_seed(0)


def tiny_config(**overrides):
    from transformers import MixtralConfig

    values = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    values.update(overrides)
    return MixtralConfig(**values)


def save_tiny_mixtral(path, seed: int = 0, **overrides):
    """A random MixtralForCausalLM whose weights are exact in bf16, saved by transformers."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Trained-like spread so routing and logits are not flat, then exact in bf16.
            p.copy_((p * 4 if p.dim() > 1 else p).to(torch.bfloat16).float())
    model.save_pretrained(path)
    tokenizer = build_tokenizer(model.config.vocab_size)
    write_tokenizer_files(path, tokenizer, model.config.max_position_embeddings)
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-mixtral"
    model = save_tiny_mixtral(path)
    return path, model


@pytest.fixture(scope="session")
def store_factory(hf_tiny, tmp_path_factory):
    """quant -> store converted from the tiny checkpoint (made once per session)."""
    made = {}

    def make(quant: str):
        if quant not in made:
            dst = tmp_path_factory.mktemp("stores") / f"tiny-{quant}"
            made[quant] = convert(hf_tiny[0], dst, quant=quant, group_size=32, progress=False)
        return made[quant]

    return make


@pytest.fixture
def store_copy(store_factory, tmp_path):
    """A private copy of a store that a test may damage."""

    def make(quant: str = "int4"):
        dst = tmp_path / f"copy-{quant}"
        shutil.copytree(store_factory(quant), dst)
        return dst

    return make


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory):
    """The shipped trained model as an int4 store (real routing, real text)."""
    from mer.data import TRAINED_MODEL

    dst = tmp_path_factory.mktemp("trained") / "stdlib-moe-int4"
    return convert(TRAINED_MODEL, dst, quant="int4", progress=False)


@pytest.fixture(scope="session")
def draft_store(tmp_path_factory):
    """The shipped draft model (stdlib-moe's tokenizer, a sixth of its size) as an int4 store."""
    from mer.data import DRAFT_MODEL

    dst = tmp_path_factory.mktemp("draft") / "stdlib-moe-draft-int4"
    return convert(DRAFT_MODEL, dst, quant="int4", progress=False)


class MemoryExperts:
    """Test-only expert provider (`mer.models.layers.ExpertProvider`): dense SwiGLU experts
    held in memory, so a model test needs no store where the store is not what it tests.

    `resident` (all by default) is what `is_resident` reports: what a draft pass may use.
    `acquired` counts each expert's uses, `passes` the forward passes that ended."""

    def __init__(self, experts: dict, resident=None) -> None:
        self.experts = experts  # (layer, expert) -> (gate [F, H], up [F, H], down [H, F])
        self.resident = set(experts) if resident is None else set(resident)
        self.acquired: dict[tuple[int, int], int] = {}
        self.passes = 0

    @classmethod
    def random(cls, config, dtype=torch.float32, seed: int = 0) -> MemoryExperts:
        gen = torch.Generator().manual_seed(seed)
        h, f = config.hidden_size, config.intermediate_size

        def w(*shape):
            return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype)

        keys = [(i, e) for i in config.moe_layers for e in range(config.num_local_experts)]
        return cls({k: (w(f, h), w(f, h), w(h, f)) for k in keys})

    @contextlib.contextmanager
    def use(self, layer: int, expert: int):
        from mer.models.layers import swiglu

        self.acquired[(layer, expert)] = self.acquired.get((layer, expert), 0) + 1
        gate, up, down = self.experts[(layer, expert)]
        yield lambda x: swiglu(x, gate, up, down)

    def is_resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.resident

    def fetch(self, layer: int, experts) -> int:
        return 0  # nothing to read

    def next_step(self) -> None:
        self.passes += 1


def memory_model(preset: str = "tiny", dtype=torch.float32, seed: int = 0, **overrides):
    """A random MoETransformer of a synthetic preset over `MemoryExperts`: no files at all."""
    from mer.config import ModelConfig
    from mer.models.naming import dense_shapes
    from mer.models.transformer import MoETransformer
    from mer.synth.checkpoint import hf_config

    config = ModelConfig.from_hf(hf_config(preset, **overrides))
    gen = torch.Generator().manual_seed(seed)
    weights = {
        name: torch.ones(shape) if len(shape) == 1 else torch.randn(*shape, generator=gen) / 8
        for name, shape in dense_shapes(config).items()
    }
    return MoETransformer(config, weights, MemoryExperts.random(config, dtype, seed), dtype)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """A random-weight Qwen2-MoE-shape store: 4 MoE layers (after one dense) of 8 experts,
    top-2, the shape of the routing traces the real-scale tests write."""
    from mer.synth.checkpoint import hf_config
    from mer.synth.store import write_random_store

    cfg = hf_config("tiny-qwen2-moe", **{
        "num_hidden_layers": 5, "num_local_experts": 8, "num_experts_per_tok": 2,
        "mlp_only_layers": [0], "hidden_size": 64, "intermediate_size": 64,
    })  # fmt: skip
    return write_random_store(tmp_path_factory.mktemp("small") / "store", cfg, progress=False)


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for every cluster test (`mer.cluster`), started once.

    Its processes get the kernel cache directory the tests use (`_kernel_cache`'s, set
    before any session fixture), so expert workers take the int4 paths the test process
    chose and compute what it computes."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=1, include_dashboard=False, object_store_memory=96 << 20,
        log_to_driver=False, configure_logging=False,
    )  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()
