"""Our forward pass against transformers' MixtralForCausalLM on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import save_tiny_mixtral
from tests.helpers import dequantized_reference

import mer.api

PROMPT = [1, 17, 93, 5, 200, 41, 41, 7, 130, 66, 2, 90]

# Stated tolerances, as max |ours - reference| / max |reference| over all logits of the
# prompt, computing in float32. Against the original weights the int4 error is int4's own
# quantization error (group 32 min-max on these Gaussian weights: ~8% per weight); against
# transformers running the same dequantized int4 weights only float rounding remains.
TOLERANCE = {"bf16": 1e-5, "int8": 0.05, "int4": 0.5}
INT4_KERNEL_TOLERANCE = 1e-5


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(store, ids, dtype="float32"):
    model = mer.api.open(store, ram_budget="64MiB", dtype=dtype)
    kv = model.transformer.new_kv_cache(len(ids))
    return model.transformer.forward(torch.tensor(ids), kv, all_logits=True)


def greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_logits_match_transformers(quant, store_factory, hf_tiny):
    ref = reference_logits(hf_tiny[1], PROMPT)
    ours = our_logits(store_factory(quant), PROMPT)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < TOLERANCE[quant], f"{quant}: relative logit error {rel:.2e}"
    if quant == "bf16":
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_int4_kernel_matches_dequantized_weights(store_factory, hf_tiny):
    store = store_factory("int4")
    ref = reference_logits(dequantized_reference(hf_tiny[1], store), PROMPT)
    ours = our_logits(store, PROMPT)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < INT4_KERNEL_TOLERANCE, f"int4 vs dequantized reference: {rel:.2e}"
    model = mer.api.open(store, ram_budget="64MiB", dtype="float32")
    tokens = list(model.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1]))
    assert tokens == greedy(dequantized_reference(hf_tiny[1], store), PROMPT, 12)


def test_greedy_tokens_match_transformers(store_factory, hf_tiny):
    model = mer.api.open(store_factory("bf16"), ram_budget="64MiB", dtype="float32")
    ours = list(model.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1]))
    assert ours == greedy(hf_tiny[1], PROMPT, 12)


def test_decode_steps_match_full_forward(store_factory, hf_tiny):
    """Prefill then one-token steps through the KV cache equals the full-sequence reference."""
    model = mer.api.open(store_factory("bf16"), ram_budget="64MiB", dtype="float32")
    kv = model.transformer.new_kv_cache(len(PROMPT))
    logits = [model.transformer.forward(torch.tensor(PROMPT[:5]), kv, all_logits=True)]
    for t in PROMPT[5:]:
        logits.append(model.transformer.forward(torch.tensor([t]), kv))
    ours = torch.cat(logits)
    ref = reference_logits(hf_tiny[1], PROMPT)
    assert (ours - ref).abs().max() / ref.abs().max() < TOLERANCE["bf16"]


def test_sliding_window_matches_transformers(tmp_path):
    from mer.store.convert import convert

    ref_model = save_tiny_mixtral(tmp_path / "hf", seed=3, sliding_window=4)
    store = convert(tmp_path / "hf", tmp_path / "store", quant="bf16", progress=False)
    ref = reference_logits(ref_model, PROMPT)
    ours = our_logits(store, PROMPT)
    assert (ours - ref).abs().max() / ref.abs().max() < TOLERANCE["bf16"]


def test_bfloat16_compute_close_to_reference(store_factory, hf_tiny):
    ref = reference_logits(hf_tiny[1], PROMPT)
    ours = our_logits(store_factory("bf16"), PROMPT, dtype="bfloat16")
    assert (ours - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_rotate_half_bit_for_bit(dtype):
    """`apply_rotary` on `Rotary.tables` (a roll against a sin table with its first half
    negated) gives the rotate-half formula's bits: x * cos + (-x2, x1) * sin."""
    from mer.models.layers import Rotary, apply_rotary

    rotary = Rotary(64, 10000.0, 128)
    positions = torch.tensor([0, 5, 77, 127])
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = rotary.cos[positions][:, None].to(dtype), rotary.sin[positions][:, None].to(dtype)
    want = x * cos + torch.cat([-x[..., 32:], x[..., :32]], -1) * sin
    assert torch.equal(apply_rotary(x, *rotary.tables(positions, dtype)), want)
