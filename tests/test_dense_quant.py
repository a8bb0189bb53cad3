"""Compact dense weights: the int8 and int4 kernels against their dequantized weights, the
tiny Mixtral with int8/int4 dense weights against transformers (stated tolerances), and
what stays exact (norms, routers, the embedding; bf16 dense in float32)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.test_parity import PROMPT, greedy, reference_logits

import mer.api
from mer.errors import ConfigError
from mer.memory import tensor_bytes
from mer.quant.dense import Int4Weight, Int8Weight, linear

# max |ours - transformers| / max |transformers| over the prompt's logits, float32 compute,
# bf16 experts: the dense weights' own quantization error (per-channel int8; int4 min-max
# groups of 64, a whole row of the tiny model's 64-wide matrices, on Gaussian weights: every
# matrix of the model is int4, unlike int4 experts' 0.5 in tests/test_parity.py).
TOLERANCE = {"int8": 0.05, "int4": 0.75}


@pytest.mark.parametrize("kind", [Int8Weight, Int4Weight])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_its_dequantized_weight(kind, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g)
    x = torch.randn(2, 5, 128, generator=g).to(dtype)  # any leading dims
    q = kind.quantize(w)
    ref = x.float() @ q.dequantize().t()
    out = linear(x, q)
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < tol
    err = ((q.dequantize() - w).abs().max() / w.abs().max()).item()
    assert err < (0.01 if kind is Int8Weight else 0.1)


def our_logits(model, ids):
    kv = model.transformer.new_kv_cache(len(ids))
    return model.transformer.forward(torch.tensor(ids), kv, all_logits=True)


def dequantized_dense(hf_model, model):
    """transformers' model holding our quantized dense matrices, dequantized."""
    ref = copy.deepcopy(hf_model)
    params = dict(ref.named_parameters())
    fam, cfg = model.config.family, model.config
    with torch.no_grad():
        for name, w in model.transformer.w.items():
            if isinstance(w, torch.Tensor):
                continue
            if name.startswith("layers."):
                i, short = name.split(".", 2)[1:]
                if short == "qkv":  # q, k and v stacked by the model: each its rows
                    parts = w.dequantize().split(model.transformer.qkv_rows[int(i)])
                    for n, part in zip("qkv", parts, strict=True):
                        params[fam.LAYER[n].format(i=int(i))].copy_(part)
                    continue
                hf = fam.LAYER[short].format(i=int(i))
            else:
                hf = fam.GLOBAL[name]
            params[hf].copy_(w.dequantize())
    assert cfg.num_hidden_layers == len(ref.model.layers)
    return ref


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_dense_matches_transformers(quant, store_factory, hf_tiny):
    store = store_factory("bf16")
    model = mer.api.open(store, ram_budget="64MiB", dtype="float32", dense_quant=quant)
    quantized = [n for n, w in model.transformer.w.items() if not isinstance(w, torch.Tensor)]
    assert "lm_head" in quantized and "layers.1.o" in quantized
    assert "layers.0.qkv" in quantized or "layers.0.q" in quantized  # stacked where they can
    for exact in ("embed", "norm", "layers.0.router", "layers.0.attn_norm"):
        assert isinstance(model.transformer.w[exact], torch.Tensor)
    ref = reference_logits(hf_tiny[1], PROMPT)
    rel = ((our_logits(model, PROMPT) - ref).abs().max() / ref.abs().max()).item()
    assert rel < TOLERANCE[quant], f"{quant} dense: relative logit error {rel:.2e}"
    # Against transformers holding the same dequantized matrices only float rounding remains,
    # and greedy decoding gives the same tokens.
    deq = dequantized_dense(hf_tiny[1], model)
    rel = ((our_logits(model, PROMPT) - reference_logits(deq, PROMPT)).abs().max()).item()
    assert rel < 1e-4 * reference_logits(deq, PROMPT).abs().max().item()
    ours = list(model.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1]))
    assert ours == greedy(deq, PROMPT, 12)


def test_int8_dense_greedy_tokens_match_transformers(store_factory, hf_tiny):
    model = mer.api.open(store_factory("bf16"), ram_budget="64MiB", dense_quant="int8",
                         dtype="float32")  # fmt: skip
    ours = list(model.tokens(PROMPT, max_tokens=12, stop_token_ids=[-1]))
    assert ours == greedy(hf_tiny[1], PROMPT, 12)


def test_quantized_dense_weights_take_less_memory(store_factory):
    store = store_factory("bf16")
    size = {
        q: tensor_bytes(mer.api.open(store, "64MiB", dense_quant=q).transformer.w.values())
        for q in ("bf16", "int8", "int4")
    }
    assert size["int4"] < size["int8"] < size["bf16"]


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_matrices_stacked_by_rows_are_each_matrix_row_for_row(scheme):
    """`concat_rows` (a layer's q, k and v as one matrix): its weight is the parts' stacked
    and its output each part's; refused for mixed schemes or widths, and for an int4 part
    that ends in a partial kernel block anywhere but last."""
    from mer.quant.dense import concat_rows, quantize

    gen = torch.Generator().manual_seed(0)
    parts = [quantize(torch.randn(n, 256, generator=gen).bfloat16(), scheme) for n in (128, 64, 80)]
    fused = concat_rows(parts)
    whole = fused if isinstance(fused, torch.Tensor) else fused.dequantize()
    each = [p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts]
    assert torch.equal(whole, torch.cat(each))
    x = torch.randn(3, 256, generator=gen).bfloat16()
    got = linear(x, fused).float().split([128, 64, 80], -1)
    for g, p in zip(got, parts, strict=True):
        # Each shape's own kernel: an int8 one may round activations to int8 on the way.
        want = linear(x, p).float()
        assert (g - want).abs().max() <= 0.03 * want.abs().max()
    other = quantize(
        torch.randn(64, 256, generator=gen).bfloat16(), "int8" if scheme != "int8" else "bf16"
    )
    assert concat_rows([parts[0], other]) is None
    assert (
        concat_rows([parts[0], quantize(torch.randn(64, 128, generator=gen).bfloat16(), scheme)])
        is None
    )
    if scheme == "int4":  # 80 rows end in a partial block of 64: only last
        assert concat_rows([parts[2], parts[0]]) is None


def test_a_model_with_q_k_v_stacked_computes_what_it_computes_unstacked(store_factory, monkeypatch):
    """The transformer stacks each layer's q, k and v where it can (one call a layer): the
    same logits as the three calls, float32."""
    from mer.models import transformer

    store = store_factory("bf16")
    stacked = mer.api.open(store, ram_budget="64MiB", dtype="float32")
    assert stacked.transformer.qkv_rows and "layers.0.q" not in stacked.transformer.w
    monkeypatch.setattr(transformer, "concat_rows", lambda ws: None)
    apart = mer.api.open(store, ram_budget="64MiB", dtype="float32")
    assert not apart.transformer.qkv_rows and "layers.0.q" in apart.transformer.w
    for m in (stacked, apart):
        kv = m.transformer.new_kv_cache(len(PROMPT) + 4)
        logits = [m.transformer.forward(torch.tensor(PROMPT), kv)]
        for _ in range(3):
            logits.append(m.transformer.forward(logits[-1][-1:].argmax(-1), kv))
        m.logits = torch.cat(logits)
    torch.testing.assert_close(stacked.logits, apart.logits, rtol=1e-5, atol=1e-5)


def test_an_unknown_dense_quant_is_refused(store_factory):
    with pytest.raises(ConfigError, match="--dense-quant"):
        mer.api.open(store_factory("bf16"), ram_budget="64MiB", dense_quant="int3")


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A tiny DeepSeek-V2 with a low-rank query, saved by transformers, and its bf16 store."""
    from tests.test_deepseek import checkpoint

    return checkpoint.__wrapped__(tmp_path_factory)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("cache", ["latent", "full"])
def test_deepseek_latent_attention_matrices_are_quantized_too(deepseek, quant, cache):
    hf, store = deepseek
    model = mer.api.open(store, ram_budget="64MiB", dtype="float32", dense_quant=quant)
    if cache == "full":  # the expanded K/V path uses kv_b through the same seam
        import dataclasses

        model.transformer.config = dataclasses.replace(model.config, mla_cache="full")
    w = model.transformer.w
    for name in ("q_a", "q_b", "kv_a", "kv_b", "o"):
        assert not isinstance(w[f"layers.1.{name}"], torch.Tensor), name
    for exact in ("q_a_norm", "kv_a_norm", "router"):
        assert isinstance(w[f"layers.1.{exact}"], torch.Tensor)
    deq = dequantized_dense(hf, model)
    ref = reference_logits(deq, PROMPT)
    rel = ((our_logits(model, PROMPT) - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{quant} MLA against its dequantized matrices: {rel:.2e}"
    assert list(model.tokens(PROMPT, max_tokens=8, stop_token_ids=[-1])) == greedy(deq, PROMPT, 8)


@pytest.mark.parametrize("path", ["tinygemm", "tinygemm-1", "c", "c-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_int4_dense_path_matches_the_dequantized_weight(path, dtype, monkeypatch, request):
    from mer.quant import dense_paths

    g = torch.Generator().manual_seed(1)
    q = Int4Weight.quantize(torch.randn(128, 256, generator=g))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one-thread paths are candidates beside parallel ones only
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    if path not in dense_paths.eligible(q.linear):
        pytest.skip(f"{path} does not run here (mer's C kernel needs AVX-512)")
    monkeypatch.setenv("MER_DENSE_INT4_PATH", path)
    for tokens in (1, 5):
        x = torch.randn(tokens, 256, generator=g).to(dtype)
        assert dense_paths.path_for(q.linear, x) == path
        ref = x.float() @ q.dequantize().t()
        out = linear(x, q)
        assert out.dtype == dtype and torch.get_num_threads() == 2  # restored after a -1 path
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < tol


def test_the_int4_dense_path_is_measured_once_per_shape_and_class():
    from mer.quant import dense_paths

    q = Int4Weight.quantize(torch.randn(192, 256))
    x = torch.randn(1, 256)
    chosen = dense_paths.path_for(q.linear, x)
    assert chosen in dense_paths.eligible(q.linear)
    key = (192, 256, q.linear.group_size, False, "decode", torch.float32, torch.get_num_threads())
    assert dense_paths._chosen[key] == chosen
    ms = dense_paths.measure(q.linear, dense_paths.eligible(q.linear), 1, torch.float32)
    assert set(ms) == set(dense_paths.eligible(q.linear)) and all(v > 0 for v in ms.values())
