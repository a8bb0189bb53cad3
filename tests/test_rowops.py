"""A decode layer's bfloat16 row kernels (`mer.models.rowops`) against the PyTorch formulas
they replace: RMSNorm and attention within bf16 rounding, the rotary embedding bit for bit,
routing to the same experts with the same weights; each row's result the same alone or
beside others; and the PyTorch formulas wherever a kernel does not apply."""

from __future__ import annotations

import pytest
import torch

from mer.models import layers, rowops

BF16 = torch.bfloat16
ULP = 2**-8  # a bfloat16 rounding, relative


def _lib_or_skip():
    if rowops._lib() is None:
        pytest.skip("no AVX512 build of the row kernels here")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows,n", [(1, 2048), (7, 40), (300, 128), (3, 4096), (2, 17)])
def test_rms_norm_matches_the_formula_and_each_row_is_its_own(rows, n):
    _lib_or_skip()
    gen = _gen(rows * n)
    x, w = torch.randn(rows, n, generator=gen).to(BF16), torch.randn(n, generator=gen).to(BF16)
    got, want = layers.rms_norm(x, w, 1e-6), layers.rms_norm_torch(x, w, 1e-6)
    assert got.dtype == BF16 and got.shape == x.shape
    assert (got.float() - want.float()).abs().max() <= 2 * ULP * want.float().abs().max()
    assert torch.equal(layers.rms_norm(x[-1:], w, 1e-6), got[-1:])  # alone as in the batch
    strided = torch.randn(rows, 2 * n, generator=gen).to(BF16)[:, :n]  # a view, not contiguous
    assert torch.equal(layers.rms_norm(strided, w, 1e-6), layers.rms_norm(strided.clone(), w, 1e-6))


@pytest.mark.parametrize("t,heads,d", [(1, 32, 128), (5, 4, 64), (300, 2, 40)])
def test_rope_is_the_formulas_bits(t, heads, d):
    _lib_or_skip()
    gen = _gen(t + heads + d)
    x = torch.randn(t, heads, d, generator=gen).to(BF16)
    rotary = layers.Rotary(d, 10000.0, 512)
    cos, sin = rotary.tables(torch.arange(t) + 3, BF16)
    assert rowops.rope(x, cos, sin) is not None
    assert torch.equal(layers.apply_rotary(x, cos, sin), x * cos + x.roll(d // 2, -1) * sin)


@pytest.mark.parametrize(
    "hq,hkv,d,dv,s",
    [(32, 4, 128, 128, 1), (32, 4, 128, 128, 390), (16, 16, 192, 128, 37), (8, 1, 64, 64, 1000),
     (6, 2, 40, 24, 17), (4, 4, 512, 512, 9)],
)  # fmt: skip
def test_one_query_attention_matches_the_float32_path(hq, hkv, d, dv, s):
    _lib_or_skip()
    gen = _gen(hq * s + d)
    q = torch.randn(1, hq, d, generator=gen).to(BF16)
    k, v = (
        torch.randn(s, hkv, d, generator=gen).to(BF16),
        torch.randn(s, hkv, dv, generator=gen).to(BF16),
    )
    window = torch.rand(1, s, generator=gen) > 0.4
    window[0, -1] = True  # a query always sees itself
    for mask in (torch.ones(1, s, dtype=torch.bool), window):
        for sinks in (None, torch.randn(hq, generator=gen)):
            got = layers.attention(q, k, v, mask, sinks, scale=0.7 * d**-0.5)
            want = layers.attention_torch(q, k, v, mask, sinks, 0.7 * d**-0.5)
            assert got.shape == (1, hq * dv) and got.dtype == BF16
            assert (got.float() - want.float()).abs().max() <= 2 * ULP * want.float().abs().max()
    assert rowops.attend_one(q, k, v, window, None, 1.0) is not None


def test_attention_takes_the_c_kernel_for_one_bf16_query_only():
    _lib_or_skip()
    q, k, v = (
        torch.randn(2, 4, 32).to(BF16),
        torch.randn(9, 2, 32).to(BF16),
        torch.randn(9, 2, 32).to(BF16),
    )
    mask = torch.ones(2, 9, dtype=torch.bool)
    assert rowops.attend_one(q, k, v, mask, None, 1.0) is None  # two queries
    assert rowops.attend_one(q[:1].float(), k.float(), v.float(), mask[:1], None, 1.0) is None
    assert rowops.attend_one(q[:1], k[:, :1].expand(9, 2, 32), v, mask[:1], None, 1.0) is None


@pytest.mark.parametrize(
    "t,e,h,k,renorm",
    [
        (1, 128, 2048, 8, True),
        (33, 60, 64, 4, False),
        (2, 8, 40, 2, True),
        (300, 16, 128, 16, True),
    ],
)
def test_routing_chooses_the_formulas_experts_and_weights(t, e, h, k, renorm):
    _lib_or_skip()
    gen = _gen(t * e + h)
    x = torch.randn(t, h, generator=gen).to(BF16)
    gate = (torch.randn(e, h, generator=gen) * h**-0.5).to(BF16)
    weights, ids = layers.route(x, gate, k, renorm)
    want_w, want_ids = layers.route_torch(x, gate, k, renorm)
    assert ids.shape == (t, k) and weights.dtype == torch.float32
    assert (weights - want_w).abs().max() < 1e-2
    # ids may differ only where two probabilities tie within bf16 rounding of the logits
    probs = torch.softmax(torch.nn.functional.linear(x, gate).float(), -1)
    assert (probs.gather(1, ids) - probs.gather(1, want_ids)).abs().max() < 1e-2
    assert (ids == want_ids).float().mean() > 0.95
    assert torch.equal(layers.route(x[-1:], gate, k, renorm)[1], ids[-1:])  # alone as batched
    transposed = x.t().contiguous().t()  # the same rows, not contiguous
    for a, b in zip(layers.route(transposed, gate, k, renorm), (weights, ids), strict=True):
        assert torch.equal(a, b)
    allowed = torch.zeros(e, dtype=torch.bool)
    allowed[: k + 1] = True  # a draft's restriction runs the formula
    assert int(layers.route(x, gate, k, renorm, allowed)[1].max()) <= k


def test_every_function_falls_back_to_the_formula_without_the_kernels(monkeypatch):
    monkeypatch.setattr(rowops, "_lib", lambda: None)
    gen = _gen(5)
    x, w = torch.randn(3, 64, generator=gen).to(BF16), torch.randn(64, generator=gen).to(BF16)
    assert torch.equal(layers.rms_norm(x, w, 1e-5), layers.rms_norm_torch(x, w, 1e-5))
    q, k = (
        torch.randn(1, 4, 64, generator=gen).to(BF16),
        torch.randn(5, 2, 64, generator=gen).to(BF16),
    )
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert torch.equal(
        layers.attention(q, k, k, mask), layers.attention_torch(q, k, k, mask, None, 0.125)
    )
    gate = torch.randn(8, 64, generator=gen).to(BF16)
    for a, b in zip(layers.route(x, gate, 2), layers.route_torch(x, gate, 2), strict=True):
        assert torch.equal(a, b)
    for f in (rowops.rms_norm(x, w, 1e-5), rowops.route(x, gate, 2, True)):
        assert f is None


def test_tensors_off_the_cpu_never_reach_the_kernels():
    x, w = torch.empty(3, 64, dtype=BF16, device="meta"), torch.empty(64, dtype=BF16, device="meta")
    assert rowops.rms_norm(x, w, 1e-5) is None
    assert rowops.route(x, torch.empty(8, 64, dtype=BF16, device="meta"), 2, True) is None


def test_float32_runs_never_take_the_kernels():
    x, w = torch.randn(3, 64), torch.randn(64)
    assert rowops.rms_norm(x, w, 1e-5) is None
    assert rowops.route(x, torch.randn(8, 64), 2, True) is None
    assert rowops.rope(torch.randn(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)) is None


def test_nan_stays_nan_as_in_the_formulas():
    """A NaN input (a broken model) must reach the logits, where the request fails loudly."""
    _lib_or_skip()
    gen = _gen(9)
    x = torch.randn(2, 64, generator=gen).to(BF16)
    x[1, 5] = float("nan")
    assert layers.rms_norm(x, torch.ones(64, dtype=BF16), 1e-6)[1].isnan().all()
    weights, ids = layers.route(x, torch.randn(16, 64, generator=gen).to(BF16), 4)
    assert ids.min() >= 0 and ids.max() < 16 and len(set(ids[1].tolist())) == 4
    assert weights[1].isnan().all() and not weights[0].isnan().any()
    q, k = (
        torch.randn(1, 4, 64, generator=gen).to(BF16),
        torch.randn(7, 2, 64, generator=gen).to(BF16),
    )
    v = k.clone()
    k[3, 0, 0] = float("nan")
    out = layers.attention(q, k, v, torch.ones(1, 7, dtype=torch.bool)).view(4, 64)
    assert out[:2].isnan().all() and not out[2:].isnan().any()  # heads of kv head 0 only


def test_a_build_that_disagrees_is_named_and_nothing_is_used(monkeypatch):
    class Fn:
        argtypes = restype = None

        def __call__(self, *args):
            pass  # computes nothing: the probe must refuse it

    class Lib:
        rms_norm_bf16 = rope_bf16 = attend_one_bf16 = route_bf16 = attend_decode_bf16 = Fn()
        argmax_f32 = decode_attention_bf16 = Fn()

        @staticmethod
        def rowops_simd():
            return 512

    monkeypatch.setattr(rowops.native, "build", lambda *a: Lib())
    rowops._lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="row kernel rms_norm_bf16 disagrees"):
            assert rowops._lib() is None
        x, w = torch.randn(2, 32).to(BF16), torch.randn(32).to(BF16)
        assert torch.equal(layers.rms_norm(x, w, 1e-6), layers.rms_norm_torch(x, w, 1e-6))
    finally:
        rowops._lib.cache_clear()


def test_shapes_that_do_not_fit_go_to_the_formula_and_its_error():
    x = torch.randn(2, 64).to(BF16)
    assert rowops.rms_norm(x, torch.ones(32, dtype=BF16), 1e-6) is None
    assert rowops.route(x, torch.randn(8, 32).to(BF16), 2, True) is None
    q, k = torch.randn(1, 4, 64).to(BF16), torch.randn(5, 2, 64).to(BF16)
    assert rowops.attend_one(q, k, k, torch.ones(1, 4, dtype=torch.bool), None, 1.0) is None
    assert rowops.attend_one(q, k, k, torch.ones(1, 5), None, 1.0) is None  # not a bool mask
    with pytest.raises(RuntimeError):
        layers.rms_norm(x, torch.ones(32, dtype=BF16), 1e-6)


@pytest.mark.parametrize("qk_norm,window", [(True, None), (False, None), (True, 5)])
def test_a_decode_tokens_attention_in_one_call_is_its_steps_bits(qk_norm, window):
    """attend_decode (QK norms, rotary, cache write, attention in one call) gives the bits
    of the row kernels it replaces called one after another, and writes the token's key
    (normed, rotated) and value at its row of the cache, nothing else."""
    _lib_or_skip()
    gen = _gen(7 + (window or 0))
    hq, hkv, d, cap, pos = 8, 2, 64, 20, 11
    q, k, v = (torch.randn(1, n * d, generator=gen).to(BF16) for n in (hq, hkv, hkv))
    qn, kn = (torch.randn(d, generator=gen).to(BF16) for _ in range(2)) if qk_norm else (None,) * 2
    kc, vc = (torch.randn(cap, hkv, d, generator=gen).to(BF16) for _ in range(2))
    rotary = layers.Rotary(d, 10000.0, 64)
    cos, sin = rotary.tables(torch.tensor([pos]), BF16)
    mask = layers.causal_mask(torch.tensor([pos]), pos + 1, window)
    want_kc, want_vc = kc.clone(), vc.clone()
    qh, kh = q.view(1, hq, d), k.view(1, hkv, d)
    if qk_norm:
        qh, kh = layers.rms_norm(qh, qn, 1e-6), layers.rms_norm(kh, kn, 1e-6)
    qh, kh = layers.apply_rotary(qh, cos, sin), layers.apply_rotary(kh, cos, sin)
    want_kc[pos], want_vc[pos] = kh[0], v.view(hkv, d)
    want = layers.attention(qh, want_kc[: pos + 1], want_vc[: pos + 1], mask)
    got = rowops.attend_decode(q, k, v, qn, kn, 1e-6, cos, sin, kc, vc, pos, mask)
    assert torch.equal(got, want)
    assert torch.equal(kc, want_kc) and torch.equal(vc, want_vc)


def test_attend_decode_declines_what_it_cannot_compute_and_writes_nothing():
    gen = _gen(3)
    q, k, v = (torch.randn(1, n * 64, generator=gen).to(BF16) for n in (4, 2, 2))
    kc, vc = (torch.zeros(6, 2, 64, dtype=BF16) for _ in range(2))
    cos = sin = torch.ones(1, 1, 64, dtype=BF16)
    mask = torch.ones(1, 4, dtype=torch.bool)

    def call(**change):
        args = dict(q=q, k=k, v=v, q_norm=None, k_norm=None, eps=1e-6, cos=cos, sin=sin,
                    k_cache=kc, v_cache=vc, pos=3, mask=mask)  # fmt: skip
        return rowops.attend_decode(**(args | change))

    assert call(q=q.float()) is None  # float32
    assert call(q=torch.randn(2, 4 * 64).to(BF16)) is None  # two tokens
    assert call(pos=6, mask=torch.ones(1, 7, dtype=torch.bool)) is None  # the cache is full
    assert call(mask=torch.ones(1, 3, dtype=torch.bool)) is None  # mask of another length
    assert call(k=torch.randn(1, 3 * 64).to(BF16)) is None  # k of other heads
    assert call(q_norm=torch.ones(32, dtype=BF16)) is None  # a norm of another width
    assert not kc.any() and not vc.any()


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-olmoe"])
def test_decoding_with_attention_in_one_call_gives_the_same_logits(preset, monkeypatch):
    """A bf16 model's decode steps take attend_decode where the family attends as the
    defaults do (Mixtral, Qwen2-MoE, Qwen3-MoE), and their logits are those of the steps
    run one by one; a family with its own q, k, v (OLMoE's norm over all heads) never
    takes it."""
    from conftest import memory_model

    _lib_or_skip()
    model = memory_model(preset, BF16)
    calls = []
    fused = rowops.attend_decode

    def counted(*args):
        out = fused(*args)
        calls.append(out is not None)
        return out

    def decode(fn) -> list[torch.Tensor]:
        monkeypatch.setattr(rowops, "attend_decode", fn)
        kv = model.new_kv_cache(16)
        logits = [model.forward(torch.tensor([5, 9, 2]), kv)]
        for token in (7, 1, 30, 4):
            logits.append(model.forward(torch.tensor([token]), kv))
        return logits

    one_call = decode(counted)
    steps = decode(lambda *args: None)
    for a, b in zip(one_call, steps, strict=True):
        assert torch.equal(a, b)
    layers_ = model.config.num_hidden_layers
    assert calls == ([True] * 4 * layers_ if preset != "tiny-olmoe" else [])


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 151936])
def test_argmax_is_torchs_with_ties_infinities_and_nans(n):
    _lib_or_skip()
    g = _gen(n)
    x = torch.randn(n, generator=g)
    cases = [x, torch.full((n,), float("-inf")), torch.zeros(n)]  # all equal: the first
    if n > 3:
        tied = x.clone()
        tied[n // 3] = tied[n - 2] = tied.max() + 1  # two maxima: the first
        inf = x.clone()
        inf[n - 1] = inf[n // 2] = float("inf")
        nan = x.clone()
        nan[n - 2] = nan[n // 2] = float("nan")  # the first NaN, beyond any maximum
        cases += [tied, inf, nan, torch.where(x > 0, float("-inf"), x)]
    for c in cases:
        assert rowops.argmax(c) == int(torch.argmax(c))


def test_argmax_declines_what_it_does_not_reduce():
    _lib_or_skip()
    assert rowops.argmax(torch.randn(8, dtype=BF16)) is None
    assert rowops.argmax(torch.randn(2, 8)) is None
    assert rowops.argmax(torch.randn(16)[::2]) is None
    assert rowops.argmax(torch.empty(0)) is None
