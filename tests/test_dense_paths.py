"""The int4 dense matrices' kernels (`mer.quant.dense_paths`) and the int8 ones' GEMV: every
path against the dequantize-then-matmul reference (stated tolerances) on shapes with odd
group counts and 1 to 300 tokens, the chooser's fallback when a kernel is missing or fails
its probe, the decode choice made by decode passes as a model opens, and float32 runs whose
tokens do not depend on the kernel or the token count."""

from __future__ import annotations

import ctypes

import pytest
import torch

import mer.api
from mer.quant import dense_paths, int4_paths, int8_gemv
from mer.quant.dense import Int4Weight, Int8Weight, linear

# (n, k): groups per row 3 (k 96 in groups of 32, 384 in 128) and 5 (320 in 64)
SHAPES = [(64, 96), (192, 384), (128, 320)]
TOKENS = [1, 2, 5, 31, 32, 33, 300]
# max |ours - reference| / max |reference|. float32 arithmetic throughout: 1e-5; bf16
# activations out: 2e-2; c-int8 rounds x per group to int8 (each value off by up to 1/254
# of its group's max) before it sums: 5e-2, as the expert c-int8 path.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
INT8_TOLERANCE = 5e-2


@pytest.fixture
def two_threads(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one-thread paths are candidates beside parallel ones only
    request.addfinalizer(lambda: torch.set_num_threads(threads))


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(dense_paths, "_chosen", {})
    monkeypatch.delenv("MER_DENSE_INT4_PATH", raising=False)


def _weight(n: int, k: int, seed: int = 0) -> Int4Weight:
    return Int4Weight.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("n, k", SHAPES)
def test_every_dense_path_matches_the_reference(n, k, two_threads):
    q = _weight(n, k)
    assert (k // q.linear.group_size) % 2 == 1  # an odd group count per row
    w = q.dequantize().double()
    for tokens in TOKENS:
        x32 = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens))
        for dtype in (torch.float32, torch.bfloat16):
            x = x32.to(dtype)
            ref = x.double() @ w.t()
            for p in dense_paths.available(q.linear):
                if "int8" in p and dtype == torch.float32:
                    continue  # never a float32 candidate (it rounds activations)
                got = dense_paths.RUNNERS[p](q.linear, x)
                assert got.dtype == dtype and got.shape == (tokens, n)
                tol = INT8_TOLERANCE if "int8" in p else TOLERANCE[dtype]
                assert _rel(got, ref) < tol, (p, dtype, tokens)
                assert torch.get_num_threads() == 2  # restored after a one-thread path


@pytest.mark.parametrize("n, k", SHAPES)
def test_the_int8_dense_path_is_exact_on_activations_rounded_to_int8(n, k):
    """c-int8's only error is its rounding of x per group: against the float64 reference on
    the same rounded activations it is float32-exact."""
    q = _weight(n, k, seed=1)
    if "c-int8" not in dense_paths.available(q.linear):
        pytest.skip("no AVX512_VNNI kernel here")
    for tokens in (1, 7, 300):
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens))
        ref = int4_paths.round_int8(x.double(), q.linear.group_size) @ q.dequantize().double().t()
        for p in ("c-int8", "c-int8-1"):
            assert _rel(dense_paths.RUNNERS[p](q.linear, x), ref) < 1e-5


def test_the_chooser_falls_back_when_a_kernel_is_missing_or_fails_its_probe(
    monkeypatch, two_threads, fresh_choices
):
    q = _weight(192, 384)
    if "c-int8" not in dense_paths.available(q.linear):
        pytest.skip("no AVX-512 VNNI kernel here: nothing to fall back from")
    monkeypatch.setattr(int4_paths, "_probe_i8", lambda lib: False)  # VNNI disagrees here
    int4_paths._probe_once.cache_clear()
    try:
        assert dense_paths.available(q.linear) == ["tinygemm", "tinygemm-1", "c", "c-1"]
        x = torch.randn(3, 384).bfloat16()
        ref = x.double() @ q.dequantize().double().t()
        for tokens in (1, 3, 64):
            assert dense_paths.path_for(q.linear, x[:1].expand(tokens, -1)) in ("tinygemm",
                   "tinygemm-1", "c", "c-1")  # fmt: skip
        assert _rel(linear(x, q), ref) < TOLERANCE[torch.bfloat16]
        monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
        assert dense_paths.path_for(q.linear, x) == "tinygemm"
        monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8-1")
        assert dense_paths.path_for(q.linear, x) == "tinygemm-1"
        # No C kernel at all (no compiler, no AVX-512, or its probe failed): PyTorch's only.
        monkeypatch.setattr(int4_paths, "native_available", lambda symmetric=False: False)
        monkeypatch.delenv("MER_DENSE_INT4_PATH")
        dense_paths._chosen.clear()
        assert dense_paths.eligible(q.linear) == ["tinygemm", "tinygemm-1"]
        assert dense_paths.eligible(q.linear, torch.float32) == ["tinygemm", "tinygemm-1"]
        assert dense_paths.path_for(q.linear, x[:1]) in ("tinygemm", "tinygemm-1")
        assert _rel(linear(x, q), ref) < TOLERANCE[torch.bfloat16]
    finally:
        monkeypatch.undo()
        int4_paths._probe_once.cache_clear()
    assert int4_paths.int8_available()


def test_a_bad_forced_dense_path_is_named(monkeypatch):
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int16")
    with pytest.raises(ValueError, match="MER_DENSE_INT4_PATH must be one of"):
        dense_paths.path_for(_weight(64, 96).linear, torch.randn(1, 96))


def test_decode_passes_choose_one_candidate_per_shape(two_threads):
    a, b = _weight(192, 384).linear, _weight(64, 384, seed=2).linear
    chosen = dense_paths.measure_decode([[a, b, a], [a, b, a]], torch.bfloat16, rounds=2)
    assert set(chosen) == {dense_paths._key(m, "decode", torch.bfloat16) for m in (a, b)}
    assert all(p in dense_paths.eligible(a) for p in chosen.values())


@pytest.mark.parametrize("decode", ["c-int8-1", "c-1", "tinygemm"])
def test_a_shapes_classes_take_the_decode_kernel(decode, two_threads, fresh_choices):
    """Kernels round differently: a shape's small batches and prefills take the kernel its
    decode took (on any thread count), so a token's output does not depend on how many
    tokens share its pass."""
    lin = _weight(192, 384).linear
    if decode not in dense_paths.available(lin):
        pytest.skip(f"no {decode} here")
    dense_paths._chosen[dense_paths._key(lin, "decode", torch.bfloat16)] = decode
    for tokens in (8, 64):  # small, prefill
        x = torch.randn(tokens, 384).to(torch.bfloat16)
        got = dense_paths.path_for(lin, x)
        assert got.removesuffix("-1") == decode.removesuffix("-1")


def test_opening_a_model_chooses_its_int4_dense_paths_so_generating_measures_nothing(
    store_factory, monkeypatch, two_threads, fresh_choices
):
    model = mer.api.open(store_factory("bf16"), ram_budget="64MiB", dense_quant="int4",
                         compute_threads=2)  # fmt: skip
    lins = [w.linear for w in model.transformer.w.values() if isinstance(w, Int4Weight)]
    keys = {dense_paths._key(m, c, torch.bfloat16) for m in lins for c in int4_paths.CLASSES}
    assert lins and keys <= set(dense_paths._chosen)
    measured = []
    monkeypatch.setattr(dense_paths, "measure_decode", lambda *a, **k: measured.append(a))
    monkeypatch.setattr(dense_paths, "measure", lambda *a, **k: measured.append(a))
    model.generate("def f(x): return x * 2 + 1", max_tokens=4)  # a prefill, then decode steps
    assert measured == []


def test_float32_tokens_do_not_depend_on_the_kernel_or_the_token_count(
    store_factory, monkeypatch, fresh_choices
):
    """An exact (float32) run takes one kernel for every class (the C kernel where it runs),
    which sums each token's row in the same order whatever else shares the call and on any
    thread count: a token's output is bit-identical alone or among 300, and greedy tokens
    are the same whichever path is forced."""
    q = _weight(128, 320, seed=3)
    assert len({p.removesuffix("-1") for p in dense_paths.eligible(q.linear, torch.float32)}) == 1
    x = torch.randn(300, 320, generator=torch.Generator().manual_seed(4))
    for p in dense_paths.eligible(q.linear, torch.float32):
        if p.startswith("c"):
            many = dense_paths.RUNNERS[p](q.linear, x)
            assert all(
                torch.equal(dense_paths.RUNNERS[p](q.linear, x[i : i + 1])[0], many[i])
                for i in (0, 1, 150, 299)
            )
    store = store_factory("bf16")
    tokens = {}
    for forced in ("", "c", "c-1", "tinygemm"):
        monkeypatch.setenv("MER_DENSE_INT4_PATH", forced)
        model = mer.api.open(store, ram_budget="64MiB", dtype="float32", dense_quant="int4")
        tokens[forced] = model.generate("def f(x):", max_tokens=12).token_ids
    assert len(set(map(tuple, tokens.values()))) == 1, tokens


# --- int8 dense matrices: PyTorch's int8 kernel, or mer's VNNI GEMV for one bf16 token ------


@pytest.mark.parametrize("n, k", [(67, 192), (64, 320), (130, 96)])  # odd groups, row tails
def test_the_int8_gemv_matches_the_reference(n, k, monkeypatch):
    """The C GEMV is float32-exact against the float64 reference on activations rounded as
    it rounds them (per group of 64), within 2e-2 of the unrounded one (bf16 out); an int8
    weight gives the same within its tolerance on 1 to 300 tokens whichever kernel runs."""
    q = Int8Weight.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)))
    w = q.dequantize().double()
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    c_runs = int8_gemv.available() and k % int8_gemv.GROUP == 0
    if c_runs:
        got = int8_gemv._gemv(int8_gemv._lib(), q.data, q.scales, x[:1])
        assert _rel(got, int8_gemv.round_int8(x[:1].double()) @ w.t()) < 1e-5
    monkeypatch.setattr(int8_gemv, "_faster", {})
    for faster in (True, False):
        monkeypatch.setattr(int8_gemv, "c_is_faster", lambda data, scales, f=faster: f)
        for tokens in TOKENS:
            took = int8_gemv.gemv(x[:tokens], q.data, q.scales)
            assert (took is not None) == (faster and c_runs and tokens == 1)
            got = linear(x[:tokens], q)
            assert got.dtype == torch.bfloat16 and got.shape == (tokens, n)
            assert _rel(got, x[:tokens].double() @ w.t()) < TOLERANCE[torch.bfloat16]
    # float32 activations (exact runs) never take the GEMV, which rounds them
    assert int8_gemv.gemv(x[:1].float(), q.data, q.scales) is None


def test_the_int8_gemv_falls_back_when_it_is_missing_or_fails_its_probe(monkeypatch):
    q = Int8Weight.quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(1, 128).bfloat16()
    ref = x.double() @ q.dequantize().double().t()
    monkeypatch.setattr(int8_gemv, "_faster", {})
    monkeypatch.setattr(int8_gemv.native, "build", lambda *a: _wrong_lib())
    int8_gemv._lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="disagrees with the reference"):
            assert not int8_gemv.available()
        assert int8_gemv.gemv(x, q.data, q.scales) is None
        assert _rel(linear(x, q), ref) < TOLERANCE[torch.bfloat16]
    finally:
        int8_gemv._lib.cache_clear()


def _wrong_lib():
    """A build that runs but computes nothing (zeros): its probe must refuse it."""

    class Fn:
        argtypes = restype = None

        def __call__(self, w, scales, x, y, n, k, threads):
            ctypes.memset(y, 0, 4 * n)

    class Lib:
        int8_gemv = Fn()

        @staticmethod
        def int8_gemv_simd():
            return 512

    return Lib()
