"""Fixtures: tiny Mixtral checkpoints built and saved by `transformers`, and stores from them."""

from __future__ import annotations

import shutil

import pytest
import torch

from mer.store.convert import convert
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Caches under the test's temp dir, and the same random draws whatever ran before."""
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mer-cache"))
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
