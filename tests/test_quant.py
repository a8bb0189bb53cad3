"""Quantized weights: packing layouts, the fast kernels against their references, extents."""

from __future__ import annotations

import pytest
import torch

from mer.quant import int4, int8
from mer.quant.expert import EXTENT_ALIGN, ExpertFormat


@pytest.mark.parametrize("layout", list(int4.LAYOUTS))
@pytest.mark.parametrize("n", [16, 64, 144, 256])
def test_pack_unpack_round_trip(layout, n):
    q = torch.randint(0, 16, (n, 96), dtype=torch.uint8)
    assert torch.equal(int4.unpack(int4.pack(q, layout), n, 96, layout), q)


def test_our_packing_is_what_torch_packs():
    q = torch.randint(0, 16, (64 * 3 + 32, 128), dtype=torch.int32)
    ours = int4.pack(q.to(torch.uint8), int4.kernel_layout())
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.01)])
def test_int4_kernel_matches_reference(group_size, m, dtype, tol):
    w = torch.randn(192, 256)
    packed, sz = int4.encode(w, group_size)
    lin = int4.Int4Linear(packed, sz, group_size, 192, 256)
    x = torch.randn(m, 256).to(dtype)
    got, ref = lin(x).float(), int4.reference_matmul(x.float(), lin).float()
    assert got.dtype == ref.dtype
    assert ((got - ref).abs().max() / ref.abs().max()) < tol


def test_int4_quantization_error_is_bounded():
    w = torch.randn(128, 256)
    q, s, z = int4.quantize(w, 32)
    err = (int4.dequantize(q, s, z, 32) - w).abs()
    assert torch.all(err <= s.repeat_interleave(32, 1) / 2 + 1e-3)  # at most half a step


def test_symmetric_int4_is_gguf_q4_0_bit_for_bit():
    """int4-sym's quantizer gives GGUF's Q4_0 reference (the `gguf` package's) its nibbles
    and float16 scales, so a store made from safetensors holds what a Q4_0 file would."""
    import numpy as np

    from mer.quant import gguf_blocks
    from mer.synth.gguf import to_gguf

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * np.exp(rng.uniform(-8, 0, (48, 1)))).astype(np.float32)
    w[3, :32] = 0  # an all-zero group: scale 0, every nibble 8
    q, scales = int4.quantize_symmetric(torch.from_numpy(w), 32)
    q_ref, s_ref, z_ref = gguf_blocks.decode(to_gguf(w, "Q4_0"), "Q4_0", 256)
    assert torch.equal(q, q_ref) and torch.equal(scales, s_ref) and not z_ref.any()
    assert scales[3, 0] == 0 and (q[3, :32] == 8).all()


@pytest.mark.parametrize("m", [1, 5])
def test_symmetric_int4_runs_on_pytorchs_kernel_too(m):
    """Where mer's C kernels do not run, PyTorch's int4 kernel computes a symmetric weight
    from (scale, zero) pairs made per call: the same product, up to bf16 rounding."""
    w = torch.randn(192, 256)
    q, s = int4.quantize_symmetric(w, 32)
    lin = int4.Int4Linear(int4.pack(q, int4.kernel_layout()), int4.pack_scales(s), 32, 192, 256)
    assert lin.symmetric and lin.scales.dtype == torch.float16 and lin.scales.shape == (8, 192)
    assert torch.equal(lin.dequantize(), int4.dequantize(q, s, torch.zeros_like(s), 32))
    x = torch.randn(m, 256)
    ref = int4.reference_matmul(x, lin)
    assert ((lin(x) - ref).abs().max() / ref.abs().max()) < 1e-2


def test_int8_kernel_matches_reference():
    w = torch.randn(96, 64)
    lin = int8.Int8Linear(*int8.encode(w))
    x = torch.randn(5, 64)
    ref = x @ lin.dequantize().t()
    assert ((lin(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    xb = x.to(torch.bfloat16)
    assert ((lin(xb).float() - ref).abs().max() / ref.abs().max()) < 0.02
    assert ((lin.dequantize() - w).abs().max() / w.abs().max()) < 0.01


def test_int4_shape_checks():
    with pytest.raises(ValueError, match="group size"):
        int4.check_shape(64, 100, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        int4.check_shape(40, 64, 32)
    with pytest.raises(ValueError, match="one of"):
        int4.check_shape(64, 64, 48)
    assert int4.default_group_size(4096, 14336) == 128
    assert int4.default_group_size(64, 96) == 32


@pytest.mark.parametrize("scheme", ["int4", "int8", "bf16"])
def test_extent_is_aligned_and_views_without_copy(scheme):
    ef = ExpertFormat.for_machine(scheme, 64, 128, 32)
    assert ef.nbytes % EXTENT_ALIGN == 0
    assert all(p.offset % 64 == 0 for p in ef.parts)
    w1, w2, w3 = torch.randn(128, 64), torch.randn(64, 128), torch.randn(128, 64)
    buf = ef.encode(w1, w2, w3)
    expert = ef.view(buf)
    if scheme == "int4":
        assert expert.gate_up.packed.data_ptr() == buf.data_ptr()
    x = torch.randn(3, 64)
    ref = (torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()
    tol = {"int4": 0.25, "int8": 0.03, "bf16": 0.01}[scheme]
    assert ((expert(x) - ref).abs().max() / ref.abs().max()) < tol


def test_store_from_another_cpu_is_repacked():
    other = next(name for name in int4.LAYOUTS if name != int4.kernel_layout())
    here = ExpertFormat.for_machine("int4", 64, 128, 32)
    there = ExpertFormat("int4", 64, 128, 32, other)
    w1, w2, w3 = torch.randn(128, 64), torch.randn(64, 128), torch.randn(128, 64)
    x = torch.randn(2, 64)
    with pytest.warns(UserWarning, match="repacked"):
        got = there.view(there.encode(w1, w2, w3))(x)
    assert torch.equal(got, here.view(here.encode(w1, w2, w3))(x))
