"""Every int4 expert path against the float64 reference, for int4 and int4-sym (a float16
scale per group, no zero: the C kernels' symmetric build), and the per-shape-class choice:
measured once, kept in a file per machine, reused, overridable."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mer.quant import int4, int4_paths, native
from mer.quant.expert import ExpertFormat, ExpertWeights

SCHEMES = ("int4", "int4-sym")


def _expert(hidden=128, ffn=256, group=64, seed=0, scheme="int4"):
    gen = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(ffn, hidden, generator=gen) / hidden**0.5 for _ in range(2))
    w2 = torch.randn(hidden, ffn, generator=gen) / ffn**0.5
    ef = ExpertFormat.for_machine(scheme, hidden, ffn, group)
    return ef, ef.view(ef.encode(w1, w2, w3))


def _reference(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    h = x.double() @ e.gate_up.dequantize().double().t()
    return (F.silu(h[:, : e.ffn]) * h[:, e.ffn :]) @ e.down.dequantize().double().t()


def _cpu_has_avx512() -> bool:
    return "avx512f" in Path("/proc/cpuinfo").read_text()


def test_the_c_kernel_builds_and_passes_its_probe_where_the_cpu_has_avx512():
    if not _cpu_has_avx512() or int4.kernel_layout() != "tinygemm-avx512":
        pytest.skip("no AVX-512 here: only PyTorch's paths run")
    assert int4_paths.native_available()
    assert int4_paths.native_available(symmetric=True)
    assert int4_paths._lib(True).int4_symmetric() == 1 and int4_paths._lib().int4_symmetric() == 0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("tokens", [1, 3, 4, 17, 40])
def test_every_path_matches_the_reference(group, tokens, scheme):
    _, e = _expert(group=group, scheme=scheme)
    assert isinstance(e, int4_paths.Int4Expert)
    assert e.down.symmetric == (scheme == "int4-sym")
    paths = int4_paths.eligible(e)
    assert paths[0] == "tinygemm"
    gen = torch.Generator().manual_seed(tokens)
    x32 = torch.randn(tokens, 128, generator=gen)
    for dtype, exact in ((torch.float32, ("c-fused", "dequant-f32")), (torch.bfloat16, ())):
        x = x32.to(dtype)
        ref = _reference(e, x.float())
        for p in paths:
            got = int4_paths.RUNNERS[p](e, x)
            assert got.dtype == dtype and got.shape == (tokens, 128)
            tol = 1e-5 if p in exact else 2e-2  # float32 arithmetic, or bf16 somewhere on the way
            tol = 5e-2 if p == "c-int8" else tol  # int8 activations: each ~1/254 of its group's max
            err = (got.double() - ref).abs().max() / ref.abs().max()
            assert err < tol, (p, dtype, float(err))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_int8_path_computes_exactly_on_activations_rounded_to_int8(group, scheme):
    """c-int8's only error is its rounding of x and of the SiLU product to int8 per group:
    against the float64 reference on the same rounded activations it is float32-exact, but
    for a product that float32 and float64 round to neighbouring int8 steps: each such one
    moves an output by one step times its down weight, and one in a token is allowed."""
    _, e = _expert(group=group, scheme=scheme)
    if "c-int8" not in int4_paths.eligible(e):
        pytest.skip("no AVX512_VNNI kernel here")
    wd = e.down.dequantize().double()
    for tokens in (1, 4, 5, 37):
        x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
        a = int4_paths.round_int8(x.double(), group) @ e.gate_up.dequantize().double().t()
        hf = F.silu(a[:, : e.ffn]) * a[:, e.ffn :]
        h = int4_paths.round_int8(hf, e.down.group_size)
        ref = h @ wd.t()
        got = int4_paths.RUNNERS["c-int8"](e, x)
        g = e.down.group_size
        step = hf.reshape(tokens, -1, g).abs().amax(-1).repeat_interleave(g, 1) / 127
        one_flip = (step[:, :, None] * wd.t().abs()[None]).amax(1)  # [tokens, hidden]
        err = (got.double() - ref).abs()
        assert (err <= 1e-5 * ref.abs().max() + one_flip).all()
        assert (err > 1e-5 * ref.abs().max()).sum() <= tokens * e.down.n // 4  # rare


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_int8_linear_on_bfloat16_rows_is_its_float32_result_rounded(scheme):
    """c_linear_i8 on bfloat16 activations widens them and rounds its output to bfloat16 in
    the kernel: the bits of the float32 call's output `.to(torch.bfloat16)`, for one token
    (whose scratch is kept per thread) and several, called again with other values."""
    _, e = _expert(scheme=scheme)
    if "c-int8" not in int4_paths.eligible(e):
        pytest.skip("no AVX512_VNNI kernel here")
    lin = e.gate_up
    for seed, tokens in enumerate((1, 1, 3, 37)):
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(tokens, lin.k, generator=gen) * 3).to(torch.bfloat16)
        got = int4_paths.c_linear_i8(lin, x)
        assert got.dtype == torch.bfloat16 and got.shape == (tokens, lin.n)
        assert torch.equal(got, int4_paths.c_linear_i8(lin, x.float()).to(torch.bfloat16))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_linear_and_the_dequantization_match_the_reference(scheme):
    if not int4_paths.native_available(scheme == "int4-sym"):
        pytest.skip("no C kernel here")
    _, e = _expert(scheme=scheme)
    x = torch.randn(5, 128)
    ref = x.double() @ e.gate_up.dequantize().double().t()
    got = int4_paths.c_linear(e.gate_up, x)
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    w = e.gate_up.dequantize()
    assert torch.equal(int4_paths.dequantize_rows(e.gate_up, 64, 128, torch.float32).t(), w[64:192])
    bf = int4_paths.dequantize_rows(e.gate_up, 0, e.gate_up.n, torch.bfloat16).t()
    assert torch.equal(bf, w.to(torch.bfloat16))  # round to nearest even, as torch rounds


def test_shape_classes():
    assert [int4_paths.shape_class(m) for m in (1, 2, 16, 31, 32, 256)] == [
        "decode", "small", "small", "small", "prefill", "prefill",
    ]  # fmt: skip


def test_the_choice_is_measured_once_kept_per_machine_and_used(monkeypatch, tmp_path):
    monkeypatch.delenv("MER_INT4_PATH", raising=False)
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path))  # other tests measured this shape
    int4_paths._chosen.clear()
    _, e = _expert(hidden=64, ffn=128, group=32)
    calls = []
    real = int4_paths.measure
    monkeypatch.setattr(int4_paths, "measure", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    choice = int4_paths.choose(e)
    assert calls == list(int4_paths.CLASSES.values())
    assert set(choice.paths) == set(int4_paths.CLASSES)
    assert choice.paths == int4_paths._pick(choice.ms)  # one path, from what was measured
    for cls in choice.paths:
        assert set(choice.ms[cls]) <= set(int4_paths.eligible(e))
    saved = json.loads(int4_paths._cache_file(e).read_text())
    assert saved["paths"] == choice.paths
    # A new process (memory forgotten) reads the file and measures nothing.
    int4_paths._chosen.clear()
    assert int4_paths.choose(e).paths == choice.paths and len(calls) == 3
    # A call takes its class's path.
    saved["paths"] = {"decode": "tinygemm", "small": "tinygemm", "prefill": "tinygemm"}
    int4_paths._cache_file(e).write_text(json.dumps(saved))
    int4_paths._chosen.clear()
    taken = []
    monkeypatch.setitem(int4_paths.RUNNERS, "tinygemm", lambda e, x: taken.append(len(x)) or x)
    e(torch.randn(1, 64, dtype=torch.bfloat16))
    e(torch.randn(33, 64, dtype=torch.bfloat16))
    assert taken == [1, 33] and len(calls) == 3
    # A choice made among fewer paths than are eligible now (the C kernel failed to build
    # that time) is measured again, not kept.
    int4_paths._chosen.clear()
    saved["candidates"] = ["tinygemm"]
    int4_paths._cache_file(e).write_text(json.dumps(saved))
    assert int4_paths.choose(e).paths == int4_paths._pick(int4_paths.choose(e).ms)
    assert len(calls) == 6
    assert json.loads(int4_paths._cache_file(e).read_text())["candidates"] == (
        int4_paths.eligible(e)
    )
    calls.clear()
    # Float32 activations have their own choice, among paths that keep them float32.
    choice32 = int4_paths.choose(e, torch.float32)
    assert len(calls) == 3
    assert not set(choice32.paths.values()) & set(int4_paths.ROUNDS_TO_BF16)


def test_a_forced_path_is_taken_and_a_bad_one_named(monkeypatch):
    _, e = _expert()
    x = torch.randn(2, 128)
    monkeypatch.setenv("MER_INT4_PATH", "dequant-f32")
    want = "dequant-f32" if "dequant-f32" in int4_paths.eligible(e) else "tinygemm"
    assert int4_paths.path_for(e, 2) == want
    ref = _reference(e, x)
    assert ((e(x).double() - ref).abs().max() / ref.abs().max()) < 1e-4
    monkeypatch.setenv("MER_INT4_PATH", "amx")
    with pytest.raises(ValueError, match="MER_INT4_PATH='amx'"):
        e(x)


def test_an_expert_with_biases_or_an_odd_shape_keeps_the_plain_path():
    ef = ExpertFormat.for_machine("int4", 96, 192, 32, bias="float32")
    e = ef.view(torch.zeros(ef.nbytes, dtype=torch.uint8))
    assert not isinstance(e, int4_paths.Int4Expert)
    ef = ExpertFormat.for_machine("int4", 96, 192, 32)
    e = ef.view(torch.zeros(ef.nbytes, dtype=torch.uint8))
    assert int4_paths.eligible(e) == ["tinygemm"]  # 96 output rows: no whole 64-row block


def test_bench_kernel_prints_each_path_and_the_choice(capsys):
    from mer.bench.kernel import kernel_bench

    kernel_bench(128, 256, [1, 40], 32, 0.02, ("int4",))
    out = capsys.readouterr().out
    assert "int4 path per shape class, measured here at first use: decode (1 tok)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("1 ", "40")]
    chosen = int4_paths.choose(_expert(hidden=128, ffn=256, group=32)[1]).paths
    assert [r[0] for r in rows[-2:]] == ["1", "40"]
    assert rows[-2][-4] == chosen["decode"] and rows[-1][-4] == chosen["prefill"]


def test_opening_a_model_measures_its_experts_paths_so_generating_measures_nothing(
    monkeypatch, tmp_path, store_factory
):
    import mer
    from mer.store.reader import Store

    monkeypatch.delenv("MER_INT4_PATH", raising=False)
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path))  # nothing measured on this "machine"
    int4_paths._chosen.clear()
    calls = []
    real = int4_paths.measure
    monkeypatch.setattr(int4_paths, "measure", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    store = store_factory("int4")
    ef = Store(store).expert_format
    if len(int4_paths.eligible(ef.view(torch.zeros(ef.nbytes, dtype=torch.uint8)))) == 1:
        pytest.skip("one path here: nothing to measure")
    with mer.open(store, dtype="float32", prefetch=False) as model:
        assert calls == list(int4_paths.CLASSES.values())  # at open, each class once
        model.generate([1, 2, 3, 4, 5], max_tokens=4)
        assert len(calls) == 3  # prefill and decode took the paths chosen at open
    int4_paths._chosen.clear()  # a new process: the machine's file answers
    with mer.open(store, dtype="float32", prefetch=False) as model:
        model.generate([1, 2, 3], max_tokens=2)
    assert len(calls) == 3


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("layout", ["tinygemm-avx512", "tinygemm-avx2"])
@pytest.mark.parametrize("tokens", [1, 2, 7])
def test_the_avx2_build_matches_the_reference_on_both_halves_layouts(layout, tokens, symmetric):
    """The kernel CPUs without AVX-512 get, built without AVX-512 and run here: on the layout
    PyTorch packs there (32-row blocks) and on this machine's (64-row blocks)."""
    if not int4_paths.avx2_available(symmetric):
        pytest.skip("no AVX2 build here")
    lib = int4_paths._lib_avx2(symmetric)
    assert lib.int4_simd() == 256  # no AVX-512 instruction in it
    gen = torch.Generator().manual_seed(tokens)
    h, f, g = 256, 192, 32
    w = torch.randn(2 * f, h, generator=gen)
    gu = int4.Int4Linear(*int4_paths._encode(w, g, layout, symmetric), g, 2 * f, h)
    wd = torch.randn(h, f, generator=gen)
    down = int4.Int4Linear(*int4_paths._encode(wd, g, layout, symmetric), g, h, f)
    x = torch.randn(tokens, h, generator=gen)
    a = x.double() @ gu.dequantize(layout).double().t()
    ref = (F.silu(a[:, :f]) * a[:, f:]) @ down.dequantize(layout).double().t()
    got = int4_paths._c_ffn_avx2_raw(lib, gu, down, f, x, int4_paths.block_rows(layout))
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert "c-avx2" in int4_paths.eligible(_expert()[1], torch.float32)  # float32: exact


def _biased_expert(hidden=128, ffn=256, group=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(ffn, hidden, generator=gen) / hidden**0.5 for _ in range(2))
    w2 = torch.randn(hidden, ffn, generator=gen) / ffn**0.5
    b_gu, b_d = torch.randn(2 * ffn, generator=gen), torch.randn(hidden, generator=gen)
    ef = ExpertFormat.for_machine("int4", hidden, ffn, group, bias="float32")
    return ef.view(ef.encode(w1, w2, w3, b_gu, b_d)), b_gu, b_d


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_biased_experts_take_the_c_kernels_with_the_bias_added(tokens, monkeypatch):
    """gpt-oss's experts carry biases and call their linear maps themselves (a clamped
    SwiGLU): each linear path, forced, matches the dequantized reference with the biases."""
    from mer.models.gpt_oss import clamped_swiglu

    e, b_gu, b_d = _biased_expert()
    assert isinstance(e, int4_paths.Int4BiasedExpert)
    paths = int4_paths.eligible(e)
    if int4_paths.native_available():
        assert "c-linear" in paths
    wgu, wd = e.gate_up.dequantize().double(), e.down.dequantize().double()
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        a = xd.double() @ wgu.t() + b_gu.double()
        ref = (F.silu(a[:, :256]) * a[:, 256:]) @ wd.t() + b_d.double()
        gate, up = a[:, :256].clamp(max=7.0), a[:, 256:].clamp(-7.0, 7.0)
        ref_oss = ((up + 1) * (gate * torch.sigmoid(gate * 1.702))) @ wd.t() + b_d.double()
        for p in int4_paths.eligible(e, dtype):
            monkeypatch.setenv("MER_INT4_PATH", p)
            exact = p == "c-linear" and dtype == torch.float32  # float32 all the way
            tol = 1e-5 if exact else 5e-2 if p == "c-linear-i8" else 2e-2
            for got, want in ((e(xd), ref), (clamped_swiglu(e, 1.702, 7.0, xd), ref_oss)):
                assert got.dtype == dtype
                err = (got.double() - want).abs().max() / want.abs().max()
                assert err < tol, (p, dtype, float(err))
    monkeypatch.delenv("MER_INT4_PATH")
    assert "c-linear-i8" not in int4_paths.eligible(e, torch.float32)  # float32 stays exact


def test_a_biased_experts_choice_is_measured_apart_and_taken(monkeypatch, tmp_path):
    monkeypatch.delenv("MER_INT4_PATH", raising=False)
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path))
    int4_paths._chosen.clear()
    e, _, _ = _biased_expert()
    if len(int4_paths.eligible(e)) == 1:
        pytest.skip("one path here")
    choice = int4_paths.choose(e)
    assert set(choice.paths.values()) <= set(int4_paths.LINEAR_PATHS)
    assert "biased" in int4_paths._cache_file(e).name
    plain = _expert(hidden=128, ffn=256, group=32)[1]
    assert int4_paths._cache_file(plain) != int4_paths._cache_file(e)
    taken = []
    run = int4_paths.LINEAR_PATHS[choice.paths["decode"]]
    monkeypatch.setitem(int4_paths.LINEAR_PATHS, choice.paths["decode"],
                        lambda lin, x: taken.append(len(x)) or run(lin, x))  # fmt: skip
    e.gate_up(torch.randn(1, 128, dtype=torch.bfloat16))
    assert taken == [1]


def test_a_shape_takes_one_path_for_every_class_in_bf16_and_float32():
    """Paths round differently: a shape's classes take one, the least slow over all of them
    relative to each class's best, so a token's output does not depend on how many tokens
    its experts saw in the pass; a saved choice that mixes paths is measured again."""
    ms = {"decode": {"c-fused": 1.0, "dequant-f32": 2.0}, "small": {"c-fused": 3.0,
          "dequant-f32": 2.0}, "prefill": {"c-fused": 30.0, "dequant-f32": 10.0}}  # fmt: skip
    assert int4_paths._pick(ms) == dict.fromkeys(ms, "dequant-f32")
    mixed = {"decode": {"c-int8": 1.0, "c-bf16": 1.2}, "small": {"c-int8": 1.1, "c-bf16": 1.0},
             "prefill": {"c-int8": 10.0, "c-bf16": 13.0}}  # fmt: skip
    assert int4_paths._pick(mixed) == dict.fromkeys(mixed, "c-int8")
    mixed["prefill"] = {"c-int8": 20.0, "c-bf16": 13.0}
    assert int4_paths._pick(mixed) == dict.fromkeys(mixed, "c-bf16")
    pruned = {"decode": {"tinygemm": 1.0, "c-bf16": 1.1}, "small": {"c-bf16": 1.0},
              "prefill": {"c-bf16": 1.0}}  # fmt: skip
    assert int4_paths._pick(pruned) == dict.fromkeys(pruned, "c-bf16")
    # No path kept in every class (a fresh machine measured this for a Qwen3 expert, and the
    # choice crashed): one dropped from a class costs PRUNE there.
    apart = {"decode": {"c-bf16": 1.0, "c-int8": 1.05}, "small": {"c-int8": 1.0},
             "prefill": {"c-bf16": 1.0, "dequant-bf16": 1.1}}  # fmt: skip
    assert int4_paths._pick(apart) == dict.fromkeys(apart, "c-bf16")
    apart["prefill"]["c-int8"] = 1.2
    assert int4_paths._pick(apart) == dict.fromkeys(apart, "c-int8")
    assert not int4_paths._consistent({"decode": "c-bf16", "small": "tinygemm",
                                       "prefill": "c-bf16"})  # fmt: skip


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_path_gives_a_token_what_it_gives_it_alone(dtype, scheme):
    """What one path per shape relies on: a path sums each token in the same order whatever
    else shares the call: mer's C kernels bit for bit; PyTorch's int4 kernel and the GEMMs
    of the dequant paths may block by the token count (AMX, other ISAs): float rounding."""
    _, e = _expert(scheme=scheme)
    x = torch.randn(40, 128).to(dtype)  # a prefill-class call
    for p in int4_paths.eligible(e, dtype):
        many, eight = int4_paths.RUNNERS[p](e, x), int4_paths.RUNNERS[p](e, x[:8])
        for i in (0, 5):
            alone = int4_paths.RUNNERS[p](e, x[i : i + 1])[0]
            for got in (many[i], eight[i]):
                if not p.startswith("c-"):
                    torch.testing.assert_close(got, alone, rtol=1e-2, atol=1e-2)
                else:
                    assert torch.equal(got, alone), p


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_token_through_several_experts_in_one_call_is_each_experts_own(
    dtype, scheme, monkeypatch
):
    """A decode step's experts of a layer run in one C call (`decode_group`): each row what
    the expert's own call gives, bit for bit, on every fused C path; None where the path is
    not one (the caller then runs each), for more than one token and for mixed shapes (or
    mixed schemes)."""
    es = [_expert(seed=s, scheme=scheme)[1] for s in range(3)]
    x = torch.randn(1, 128).to(dtype)
    for p in int4_paths.eligible(es[0], dtype):
        monkeypatch.setenv("MER_INT4_PATH", p)
        got = int4_paths.decode_group(es, x)
        if p not in ("c-fused", "c-bf16", "c-int8"):
            assert got is None, p
            continue
        assert [y.dtype for y in got] == [dtype] * 3
        assert all(torch.equal(y, e(x)) for y, e in zip(got, es, strict=True)), p
        # Their weighted sum, rounded as the MoE block rounds it: each product in dtype,
        # then added one after another in dtype.
        w = torch.rand(3)
        summed = None
        for e, wi in zip(es, w, strict=True):
            p_i = (e(x) * wi).to(dtype)
            summed = p_i if summed is None else summed + p_i
        assert torch.equal(int4_paths.decode_group(es, x, w.tolist()), summed), p
        assert int4_paths.decode_group(es, torch.randn(2, 128).to(dtype)) is None
        other = _expert(hidden=128, ffn=192, group=64)[1]
        assert int4_paths.decode_group([*es, other], x) is None
        twin = _expert(scheme=({*SCHEMES} - {scheme}).pop())[1]  # same shape, other scheme
        assert int4_paths.decode_group([*es, twin], x) is None


@pytest.fixture
def built_without_vbmi(monkeypatch):
    """The int4 kernels as a CPU with AVX-512 VNNI but no VBMI builds them (Cascade Lake):
    its nibbles are interleaved by unpacks instead of byte permutations."""
    build = native.build_avx512

    def without(source, what, simd, flags=()):
        return build(source, what, simd, (*flags, "-mno-avx512vbmi"))

    monkeypatch.setattr(native, "build_avx512", without)
    int4_paths._built.cache_clear()
    yield
    monkeypatch.undo()
    int4_paths._built.cache_clear()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_int8_kernels_give_the_same_bits_with_and_without_byte_permutations(
    scheme, request, monkeypatch
):
    if not int4_paths.int8_available() or not int4_paths._lib().int4_permutes_bytes():
        pytest.skip("no AVX512_VNNI and VBMI here: only one interleaving builds")
    es = [_expert(seed=s, scheme=scheme, group=32)[1] for s in range(3)]
    lin = es[0].gate_up
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(t, 128, generator=gen).bfloat16() for t in (1, 3, 5, 40)]
    monkeypatch.setenv("MER_INT4_PATH", "c-int8")

    def outputs():
        return [
            *(int4_paths.RUNNERS["c-int8"](es[0], x) for x in xs),
            *(int4_paths.c_linear_i8(lin, x) for x in xs),
            *int4_paths.decode_group(es, xs[0]),
        ]

    permuted = outputs()
    request.getfixturevalue("built_without_vbmi")
    assert int4_paths.int8_available() and not int4_paths._lib().int4_permutes_bytes()
    for a, b in zip(permuted, outputs(), strict=True):
        assert torch.equal(a, b)


class _Experts:
    """An expert provider over experts in RAM, all but those in `missing`, which it
    serves only after `fetch` (as a cache serves a read)."""

    def __init__(self, es, missing=()):
        self.es, self.missing = es, set(missing)

    def is_resident(self, layer, e):
        return e not in self.missing

    def fetch(self, layer, experts):
        return len(experts)

    @contextlib.contextmanager
    def use(self, layer, e):
        yield self.es[e]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tokens_moe_output_is_the_same_alone_in_a_batch_or_with_experts_missing(
    dtype, monkeypatch
):
    """The MoE block sums a token's weighted expert outputs in expert order, rounding after
    each add, on every path: one token with every expert in RAM (one C call and its sum),
    one token with some read later (each expert on its own), and a batch (each expert over
    its tokens), so a token's output never depends on its batch or the cache (bit for bit
    where the experts' kernels are mer's own)."""
    from mer.models.layers import moe

    es = [_expert(seed=s)[1] for s in range(6)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 128, generator=gen).to(dtype)
    scores = torch.rand(5, 6, generator=gen)
    weights, ids = torch.topk(scores.softmax(-1), 3, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    for p in int4_paths.eligible(es[0], dtype):
        monkeypatch.setenv("MER_INT4_PATH", p)
        batch = moe(x, weights, ids, 0, _Experts(es))
        for t in range(5):
            one = (x[t : t + 1], weights[t : t + 1], ids[t : t + 1], 0)
            alone = moe(*one, _Experts(es))
            some_missing = moe(*one, _Experts(es, missing=ids[t, :2].tolist()))
            assert torch.equal(some_missing, alone), (p, t)
            if p.startswith("c-"):  # mer's kernels: an expert's row whatever shares its call
                assert torch.equal(alone[0], batch[t]), (p, t)
            else:  # PyTorch's GEMMs may block by the token count
                torch.testing.assert_close(alone[0], batch[t], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n,hidden", [(1, 64), (8, 2048), (6, 600), (3, 257)])
def test_the_c_moe_sum_rounds_each_step_as_the_moe_block(n, hidden):
    """`moe_sum_bf16` (strips of elements, vectorised) against the MoE block's steps: each
    expert's output to bf16, times its weight, to bf16, then added in expert order in bf16."""
    import ctypes

    lib = int4_paths._lib()
    if lib is None:
        pytest.skip("no C kernel here")
    gen = torch.Generator().manual_seed(n * hidden)
    y, w = torch.randn(n, hidden, generator=gen) * 3, torch.rand(n, generator=gen)
    want = None
    for yi, wi in zip(y, w, strict=True):
        p = (yi.bfloat16() * wi).bfloat16()
        want = p if want is None else want + p
    out = torch.empty(hidden, dtype=torch.bfloat16)
    lib.moe_sum_bf16(y.data_ptr(), (ctypes.c_float * n)(*w.tolist()), out.data_ptr(), n, hidden)
    assert torch.equal(out, want)
