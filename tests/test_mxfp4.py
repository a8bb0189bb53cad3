"""MXFP4 experts: the checkpoint's bytes kept exact through a real store, the kernel against
its reference, rounding float weights, biases, and bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import dequantized_reference
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import mer.api
from mer.cache.expert_cache import ExpertCache
from mer.config import ModelConfig
from mer.quant import mxfp4, native
from mer.quant.expert import ExpertFormat
from mer.store.reader import Store
from mer.store.writer import StoreWriter

HIDDEN, FFN, EXPERTS, LAYERS = 64, 96, 4, 2


def checkpoint_blocks(n_experts, n, k, gen):
    """What a gpt-oss checkpoint ships for one projection of a layer: `*_blocks` uint8
    [E, n, k/32, 16] and `*_scales` uint8 [E, n, k/32], with every code and every scale byte
    but 255 (E8M0's NaN), 0 (a subnormal power of two) included."""
    blocks = torch.randint(0, 256, (n_experts, n, k // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (n_experts, n, k // 32), dtype=torch.uint8, generator=gen)
    m = min(255, scales.numel())
    scales.view(-1)[:m] = torch.arange(m, dtype=torch.uint8)
    return blocks, scales


def hf_config():
    return dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )


def test_reference_dequantization_is_transformers_bit_for_bit():
    blocks, scales = checkpoint_blocks(2, 2 * FFN, HIDDEN, torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, k, n]
        for e in range(2):
            ours = mxfp4.dequantize(blocks[e], scales[e])  # [n, k]
            assert torch.equal(ours.to(dtype), theirs[e].t())


def test_store_keeps_checkpoint_blocks_bit_exact(tmp_path):
    """gpt-oss layout through a real store and a real O_DIRECT cache read: the gate/up rows
    interleaved in the checkpoint are split into gate then up (whole rows, so still exact),
    and every dequantized weight the store serves equals transformers' dequantization."""
    gen = torch.Generator().manual_seed(2)
    ef = ExpertFormat.for_machine("mxfp4", HIDDEN, FFN, bias="bfloat16")
    cfg = ModelConfig.from_hf(hf_config())
    layers = {
        layer: (
            checkpoint_blocks(EXPERTS, 2 * FFN, HIDDEN, gen),
            checkpoint_blocks(EXPERTS, HIDDEN, FFN, gen),
            torch.randn(EXPERTS, 2 * FFN, generator=gen).to(torch.bfloat16),
            torch.randn(EXPERTS, HIDDEN, generator=gen).to(torch.bfloat16),
        )
        for layer in range(LAYERS)
    }
    with StoreWriter(tmp_path / "store", cfg, hf_config(), ef) as writer:
        for layer, ((gub, gus), (db, ds), gu_bias, d_bias) in layers.items():
            for e in range(EXPERTS):
                halves = lambda t, e=e: torch.cat([t[e, 0::2], t[e, 1::2]])  # noqa: E731
                extent = ef.encode_native(
                    {"blocks": halves(gub), "scales": halves(gus)},
                    {"blocks": db[e], "scales": ds[e]},
                    halves(gu_bias),
                    d_bias[e],
                )
                writer.add_expert(layer, e, extent)
        path = writer.close()

    store = Store(path)
    assert store.expert_format == ef
    assert store.manifest["format_version"] == 2  # an older mer, blind to biases, refuses it
    cache = ExpertCache(store, 2 * ef.nbytes, threads=1)
    try:
        for layer, ((gub, gus), (db, ds), gu_bias, d_bias) in layers.items():
            gate_up_ref = convert_moe_packed_tensors(gub, gus, dtype=torch.float32)
            down_ref = convert_moe_packed_tensors(db, ds, dtype=torch.float32)
            for e in range(EXPERTS):
                with cache.use(layer, e) as w:
                    gu = gate_up_ref[e].t()
                    assert torch.equal(w.gate_up.dequantize(), torch.cat([gu[0::2], gu[1::2]]))
                    assert torch.equal(w.down.dequantize(), down_ref[e].t())
                    assert torch.equal(w.gate_up.bias[:FFN], gu_bias[e, 0::2])
                    assert torch.equal(w.down.bias, d_bias[e])
    finally:
        cache.engine.close()


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6, 37])
@pytest.mark.parametrize("n", [4, 23, 64])
def test_kernel_matches_reference(t, n):
    gen = torch.Generator().manual_seed(t * 100 + n)
    blocks, scales = checkpoint_blocks(1, n, 128, gen)
    scales[:] = torch.randint(118, 136, scales.shape, dtype=torch.uint8, generator=gen)
    lin = mxfp4.Mxfp4Linear(blocks[0], scales[0], n, 128)
    w = lin.dequantize().double()
    x = torch.randn(t, 128, generator=gen)
    ref = x.double() @ w.t()
    scale = ref.abs().max()
    assert ((lin(x).double() - ref).abs().max() / scale) < 1e-5
    assert ((mxfp4._torch_matmul(x, lin).double() - ref).abs().max() / scale) < 1e-5
    # bfloat16 activations (the model's default): the bf16 kernel from 2 tokens, where the
    # CPU has one; against the reference on the same bf16 x before rounding the output
    xb = x.to(torch.bfloat16)
    ref = xb.double() @ w.t()
    for kernel, dtype in ((mxfp4.native_kernel(), torch.float32), (mxfp4.bf16_kernel(), xb.dtype)):
        if kernel is not None:
            y = torch.empty(t, n)
            kernel(lin.blocks, lin.scales, mxfp4.arrange(xb, dtype), y)
            assert ((y.double() - ref).abs().max() / scale) < 1e-5
    got = lin(xb)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - ref).abs().max() / scale) < 0.01


def test_scales_the_bf16_kernel_cannot_scale_exactly_take_the_float32_one():
    """Scale byte 1 puts +-0.5 at 2^-127, no normal bfloat16: those weights run in float32."""
    gen = torch.Generator().manual_seed(5)
    blocks, _ = checkpoint_blocks(1, 16, 64, gen)
    lin = mxfp4.Mxfp4Linear(blocks[0], torch.ones(16, 2, dtype=torch.uint8), 16, 64)
    assert not lin.bf16_exact
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    ref = x.double() @ lin.dequantize().double().t()
    y = torch.empty(5, 16)
    mxfp4.native_kernel()(lin.blocks, lin.scales, mxfp4.arrange(x, torch.float32), y)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("scale, x_scale", [(2, 1.0), (252, 2.0**-10)])
def test_bf16_kernel_is_exact_at_the_edges_of_its_scales(scale, x_scale):
    if mxfp4.bf16_kernel() is None:
        pytest.skip("this CPU has no bf16 MXFP4 kernel")
    gen = torch.Generator().manual_seed(scale)
    blocks, _ = checkpoint_blocks(1, 16, 64, gen)
    lin = mxfp4.Mxfp4Linear(blocks[0], torch.full((16, 2), scale, dtype=torch.uint8), 16, 64)
    assert lin.bf16_exact
    x = (torch.randn(5, 64, generator=gen) * x_scale).to(torch.bfloat16)
    ref = x.double() @ lin.dequantize().double().t()
    assert ref.isfinite().all()
    y = torch.empty(5, 16)
    mxfp4.bf16_kernel()(lin.blocks, lin.scales, mxfp4.arrange(x, torch.bfloat16), y)
    # vdpbf16ps drops terms and partial sums below 2^-126 (DAZ/FTZ): an absolute error of at
    # most a few such units, visible only on outputs this tiny (scale 2 here)
    err = (y.double() - ref).abs().max()
    assert err < 1e-5 * ref.abs().max() + 4 * 64 * 2.0**-126
    assert torch.equal(lin(x), y.to(torch.bfloat16))  # 5 bf16 tokens: the bf16 kernel runs


def test_the_native_kernel_is_chosen_where_a_compiler_is():
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler here: the torch path runs instead")
    assert mxfp4.native_kernel() is not None
    assert mxfp4.kernel_description().startswith("C, ")


@pytest.mark.parametrize(
    "flags, simd", [(("-mno-avx512f",), 256), (("-mno-avx512f", "-mno-avx2"), 0)]
)
def test_the_paths_other_cpus_take_match_too(flags, simd):
    """The AVX2 and the portable builds, as CPUs without AVX-512 (or AVX2) compile them."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    lib = native.build(mxfp4.SOURCE, flags)
    if simd == 256 and lib.mxfp4_simd() != 256:
        pytest.skip("this CPU has no AVX2")
    assert lib.mxfp4_simd() == simd
    assert mxfp4.probe(mxfp4.wrap(lib))


def test_model_on_an_mxfp4_store_matches_transformers_on_its_weights(store_factory, hf_tiny):
    """`mer convert --quant mxfp4` of a float checkpoint, run by our model, against
    transformers running the same (dequantized) weights: only float rounding remains."""
    store = store_factory("mxfp4")
    prompt = [1, 17, 93, 5, 200, 41, 41, 7, 130, 66, 2, 90]
    reference = dequantized_reference(hf_tiny[1], store)
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0]
    model = mer.api.open(store, ram_budget="64MiB", dtype="float32")
    kv = model.transformer.new_kv_cache(len(prompt))
    ours = model.transformer.forward(torch.tensor(prompt), kv, all_logits=True)
    assert ((ours - ref).abs().max() / ref.abs().max()) < 1e-5
    tokens = list(model.tokens(prompt, max_tokens=8, stop_token_ids=[-1]))
    out = reference.generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
    )
    assert tokens == out[0, len(prompt) :].tolist()


def test_view_runs_the_ffn_with_biases_like_float_reference():
    ef = ExpertFormat.for_machine("mxfp4", HIDDEN, FFN, bias="float32")
    w1, w2, w3 = torch.randn(FFN, HIDDEN), torch.randn(HIDDEN, FFN), torch.randn(FFN, HIDDEN)
    b_gu, b_d = torch.randn(2 * FFN), torch.randn(HIDDEN)
    buf = ef.encode(w1, w2, w3, b_gu, b_d)
    expert = ef.view(buf)
    assert expert.gate_up.linear.blocks.data_ptr() == buf.data_ptr()  # no copy
    wgu, wd = expert.gate_up.dequantize(), expert.down.dequantize()
    x = torch.randn(5, HIDDEN)
    h = x @ wgu.t() + b_gu
    ref = (torch.nn.functional.silu(h[:, :FFN]) * h[:, FFN:]) @ wd.t() + b_d
    assert ((expert(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    # against the original float weights: MXFP4's own rounding error
    h = x @ torch.cat([w1, w3]).t() + b_gu
    exact = (torch.nn.functional.silu(h[:, :FFN]) * h[:, FFN:]) @ w2.t() + b_d
    assert ((expert(x) - exact).abs().max() / exact.abs().max()) < 0.25


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_subnormal=False, width=32), min_size=64, max_size=64))
def test_quantize_rounds_to_the_nearest_value(values):
    w = torch.tensor(values, dtype=torch.float32).reshape(2, 32)
    blocks, scales = mxfp4.quantize(w)
    got = mxfp4.dequantize(blocks, scales)
    step = torch.ldexp(torch.ones(2), scales.long().squeeze(1) - 127)  # the block's 2^e
    grid = torch.tensor(mxfp4._MAGNITUDES) * step[:, None, None]  # [2, 1, 8]
    best = (w.abs()[..., None] - grid).abs().amin(-1)  # distance to the nearest magnitude
    assert torch.all((got - w).abs() <= best * (1 + 1e-6))
    assert torch.all(w.abs() <= 6 * step[:, None])  # the scale clips nothing
    # nor is it larger than it must be (unless E8M0's smallest, 2^-127, is still too large)
    assert torch.all((w.abs().amax(-1) > 3 * step) | (w == 0).all(-1) | (scales[:, 0] == 0))
    # values already on the grid come back exactly
    again = mxfp4.dequantize(*mxfp4.quantize(got))
    assert torch.equal(again, got)


def test_quantize_ties_round_to_even():
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5])  # scale 1: ties between codes
    got = mxfp4.dequantize(*mxfp4.quantize(w))[0, :6]
    assert got.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0]


def test_format_round_trips_through_its_manifest_entry():
    ef = ExpertFormat.for_machine("mxfp4", 2880, 2880, bias="bfloat16")
    assert ExpertFormat.from_dict(ef.to_dict()) == ef
    assert [p.name for p in ef.parts] == [
        "gate_up.blocks", "down.blocks", "gate_up.scales", "down.scales",
        "gate_up.bias", "down.bias",
    ]  # fmt: skip
    weights = 3 * 2880 * 2880  # at 4.25 bits each (a scale byte per 32), then the biases
    assert ef.nbytes == -(-(weights * 17 // 32 + 3 * 2880 * 2) // 4096) * 4096


def test_bad_input_says_what_and_where():
    with pytest.raises(ValueError, match="down projection: input dim 100 is not a multiple"):
        ExpertFormat("mxfp4", 64, 100)
    with pytest.raises(ValueError, match="bias dtype"):
        ExpertFormat("mxfp4", 64, 96, bias="int8")
    ef = ExpertFormat("mxfp4", HIDDEN, FFN)
    good = {"blocks": torch.zeros(HIDDEN, FFN // 32, 16, dtype=torch.uint8),
            "scales": torch.zeros(HIDDEN, FFN // 32, dtype=torch.uint8)}  # fmt: skip
    short = {"blocks": torch.zeros(2 * FFN, 1, 16, dtype=torch.uint8),
             "scales": torch.zeros(2 * FFN, 1, dtype=torch.uint8)}  # fmt: skip
    with pytest.raises(ValueError, match=r"part gate_up.blocks: got torch.uint8 \(192, 1, 16\)"):
        ef.encode_native(short, good)
    with pytest.raises(ValueError, match="no biases"):
        ef.encode(torch.zeros(FFN, HIDDEN), torch.zeros(HIDDEN, FFN), torch.zeros(FFN, HIDDEN),
                  torch.zeros(2 * FFN), torch.zeros(HIDDEN))  # fmt: skip
    with pytest.raises(ValueError, match="carries biases"):
        ExpertFormat("mxfp4", HIDDEN, FFN, bias="float32").encode_native(good, good)
    with pytest.raises(ValueError, match="has no part down.zeros"):
        ef.encode_native(good, {**good, "zeros": good["scales"]})
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp8'"):
        ExpertFormat("fp8", HIDDEN, FFN)


def test_without_a_compiler_the_torch_path_runs_and_says_so(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("MER_CACHE_DIR", "/nonexistent/cache")  # no earlier build to reuse
    mxfp4._native.cache_clear()
    try:
        with pytest.warns(UserWarning, match="slow torch path"):
            assert mxfp4.native_kernel() is None
        blocks, scales = mxfp4.quantize(torch.randn(48, 64))
        lin = mxfp4.Mxfp4Linear(blocks, scales, 48, 64)
        x = torch.randn(3, 64)
        ref = mxfp4.reference_matmul(x, lin)
        assert ((lin(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    finally:
        mxfp4._native.cache_clear()
