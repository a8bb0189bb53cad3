"""Synthetic checkpoints: the real Hugging Face layout, deterministic, any size by streaming."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mer.config import ModelConfig
from mer.errors import ConfigError, MerError
from mer.store.reader import Store
from mer.synth.checkpoint import hf_config, write_hf_checkpoint
from mer.synth.store import write_random_store
from mer.synth.tokenizer import build_tokenizer


def load_all(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_transformers_loads_a_synthetic_checkpoint(tmp_path):
    from transformers import AutoTokenizer, MixtralForCausalLM

    path = write_hf_checkpoint(tmp_path / "ckpt", hf_config("tiny"), progress=False)
    model, info = MixtralForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    assert ids[0, 0] == 1  # <s> prepended, as Mixtral's tokenizer does
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 0.1


@pytest.mark.parametrize(
    "preset",
    [
        "tiny-qwen2-moe",
        "tiny-qwen3-moe",
        "tiny-olmoe",
        "tiny-deepseek-v2",
        "tiny-deepseek-v3",
        "tiny-glm-4.5",
    ],
)
def test_family_presets_load_in_transformers_and_run_here(preset, tmp_path):
    import transformers

    import mer
    from mer.store.convert import convert

    cfg = hf_config(preset)
    path = write_hf_checkpoint(tmp_path / "ckpt", cfg, progress=False)
    cls = getattr(transformers, cfg["architectures"][0])
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    store = convert(path, tmp_path / "store", quant="bf16", progress=False)
    ours = mer.open(store, ram_budget="64MiB", dtype="float32")
    ids = [1, 40, 41, 42, 43]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False)[0, 5:].tolist()  # fmt: skip
    assert list(ours.tokens(ids, max_tokens=6, stop_token_ids=[-1])) == want


def test_full_size_family_presets_have_published_shapes():
    q2 = ModelConfig.from_hf(hf_config("qwen2-moe-a2.7b"))
    assert (q2.num_local_experts, q2.intermediate_size, q2.shared_expert_intermediate_size) == (
        60, 1408, 5632)  # fmt: skip
    q3 = ModelConfig.from_hf(hf_config("qwen3-moe-30b-a3b"))
    assert (q3.num_hidden_layers, q3.num_local_experts, q3.num_experts_per_tok) == (48, 128, 8)
    assert q3.qk_norm == "head" and q3.head_dim == 128 and q3.dense_layers == ()
    ol = ModelConfig.from_hf(hf_config("olmoe-1b-7b"))
    assert (ol.num_local_experts, ol.num_experts_per_tok, ol.qk_norm) == (64, 8, "full")
    assert (
        ModelConfig.from_hf(hf_config("tiny-qwen3-moe", num_local_experts=4)).num_local_experts == 4
    )


def test_sharding_does_not_change_weights(tmp_path):
    cfg = hf_config("tiny")
    one = write_hf_checkpoint(tmp_path / "one", cfg, progress=False)
    many = write_hf_checkpoint(tmp_path / "many", cfg, max_shard_bytes=100_000, progress=False)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_all(one).values())
    a, b = load_all(one), load_all(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other_seed = load_all(write_hf_checkpoint(tmp_path / "s1", cfg, seed=1, progress=False))
    assert not torch.equal(a["lm_head.weight"], other_seed["lm_head.weight"])


def test_tokenizer_round_trips_and_is_deterministic(tmp_path, monkeypatch):
    tok = build_tokenizer(512)
    for text in ["def fib(n):\n    return n", "héllo wörld ☃ 日本語", "  \t\n", "x" * 300]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path / "fresh"))
    assert build_tokenizer(512).to_str() == tok.to_str()  # retrained from scratch, same bytes


def test_presets_and_overrides():
    full = ModelConfig.from_hf(hf_config("mixtral-8x7b"))
    assert (full.num_hidden_layers, full.num_local_experts, full.hidden_size) == (32, 8, 4096)
    assert (full.num_attention_heads, full.num_key_value_heads, full.vocab_size) == (32, 8, 32000)
    assert 3 * full.hidden_size * full.intermediate_size == 3 * 4096 * 14336
    assert ModelConfig.from_hf(hf_config("tiny", num_hidden_layers=3)).num_hidden_layers == 3
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        hf_config("huge")
    with pytest.raises(ConfigError, match="bogus"):
        hf_config("tiny", bogus=1)


def test_refuses_existing_directory(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(MerError, match="already exists"):
        write_hf_checkpoint(tmp_path / "x", hf_config("tiny"), progress=False)


def test_random_store_is_valid_and_runs(tmp_path):
    import mer.api

    path = write_random_store(tmp_path / "store", hf_config("tiny", num_hidden_layers=3),
                              progress=False)  # fmt: skip
    s = Store(path)
    assert s.config.num_hidden_layers == 3 and s.expert_format.scheme == "int4"
    model = mer.api.open(path, ram_budget=4 * s.expert_format.nbytes)
    text = model.generate("def f(x):", max_tokens=8).text
    assert isinstance(text, str)
    assert model.stats().cache.misses > 0
