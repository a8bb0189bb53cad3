"""One bf16 token through a dense matrix: the C GEMV against the float64 reference, taken
only where measured faster, never for float32 or several tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mer.quant import bf16_gemv, dense


def _lib_or_skip():
    if bf16_gemv._lib() is None:
        pytest.skip("no AVX512_BF16 GEMV here")
    return bf16_gemv._lib()


@pytest.mark.parametrize("n,k", [(64, 32), (67, 96), (1024, 4096), (3, 256)])
def test_the_c_gemv_matches_the_reference(n, k):
    lib = _lib_or_skip()
    gen = torch.Generator().manual_seed(n)
    w, x = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(k, generator=gen).bfloat16()
    ref = w.double() @ x.double()
    got = bf16_gemv._gemv(lib, w, x)
    assert got.shape == (n,) and ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_the_seam_takes_the_gemv_only_for_one_bf16_token_where_it_measured_faster(monkeypatch):
    _lib_or_skip()
    w, b = torch.randn(128, 64).bfloat16(), torch.randn(128).bfloat16()
    monkeypatch.setitem(bf16_gemv._faster, (128, 64, torch.get_num_threads()), True)
    x = torch.randn(1, 1, 64).bfloat16()
    y = dense.linear(x, w, b)
    assert y.shape == (1, 1, 128) and y.dtype == torch.bfloat16
    ref = x.double() @ w.double().t() + b.double()
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output
    for x in (torch.randn(2, 64).bfloat16(), torch.randn(1, 64)):  # two tokens; float32
        assert bf16_gemv.gemv(x, w if x.dtype == torch.bfloat16 else w.float()) is None
        assert torch.equal(dense.linear(x, w.to(x.dtype)), F.linear(x, w.to(x.dtype)))
    monkeypatch.setitem(bf16_gemv._faster, (128, 64, torch.get_num_threads()), False)
    assert bf16_gemv.gemv(torch.randn(1, 64).bfloat16(), w) is None  # measured slower


def test_a_model_measures_its_shapes_at_open_not_while_generating(store_factory, monkeypatch):
    import mer

    calls = []
    real = bf16_gemv._measure
    monkeypatch.setattr(bf16_gemv, "_measure", lambda lib, w: calls.append(w.shape) or real(lib, w))
    bf16_gemv._faster.clear()
    with mer.open(store_factory("int4"), prefetch=False) as model:  # bf16
        opened = len(calls)
        model.generate([1, 2, 3], max_tokens=3)
    if bf16_gemv._lib() is not None:
        assert opened > 0
    assert len(calls) == opened
