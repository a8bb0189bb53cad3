"""A lone decode token through a layer's attention half in one C call
(`mer.models.decode_layer`): the same logits, routing and cache as the Python path, which
every layer it does not fit keeps."""

from __future__ import annotations

import pytest
import torch

from mer.models import rowops
from mer.models.decode_layer import DecodeAttention
from mer.quant import dense_paths, int4_paths
from mer.quant.dense import quantize

BF16 = torch.bfloat16
# int4-sized tiny shapes: q/k/v and o take the int4 kernels' blocks and a group of 128
SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64}  # fmt: skip


def _skip_without_kernels():
    if rowops._lib() is None or not int4_paths.int8_available():
        pytest.skip("the AVX-512 row kernels or the int8-activation int4 kernel do not run here")


def model(preset: str, dtype=BF16, dense: str = "int4", **overrides):
    """A random MoETransformer of `preset` with its attention matrices in `dense`."""
    from conftest import MemoryExperts
    from mer.config import ModelConfig
    from mer.models.naming import dense_shapes
    from mer.models.transformer import MoETransformer
    from mer.synth.checkpoint import hf_config

    config = ModelConfig.from_hf(hf_config(preset, **SHAPE | overrides))
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in dense_shapes(config).items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(*shape, generator=gen) / 8
        if name.rsplit(".", 1)[-1] in ("q", "k", "v", "o") and name.startswith("layers."):
            t = quantize(t, dense)
        weights[name] = t
    return MoETransformer(config, weights, MemoryExperts.random(config, dtype, 0), dtype)


def decode(m, fused: bool, monkeypatch, draft: bool = False, capacity: int = 16):
    """Logits of a 3-token prompt and four decode steps, the routing the hooks heard, and
    how many layer calls took the one C call."""
    calls, routed = [], []
    run = DecodeAttention.run

    def counted(self, *args, **kw):
        out = run(self, *args, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(DecodeAttention, "run", counted)
    if not fused:
        monkeypatch.setattr(DecodeAttention, "applies", lambda self, i: False)
    hook = lambda layer, h, ids, w: routed.append((layer, ids.clone(), w.clone(), h.clone()))  # noqa: E731
    m.routing_hooks[:] = [hook]
    kv = m.new_kv_cache(capacity)
    logits = [m.forward(torch.tensor([5, 9, 2]), kv)]
    for token in (7, 1, 30, 4):
        logits.append(m.forward(torch.tensor([token]), kv, draft=draft))
    monkeypatch.undo()
    return logits, routed, calls, kv


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}),  # Mixtral: no QK norms
    ("tiny-qwen3-moe", {}),  # per-head QK norms
    ("tiny", {"sliding_window": 3}),  # a window masks the oldest keys
])  # fmt: skip
def test_a_decode_layer_in_one_call_is_the_python_paths_bits(preset, overrides, monkeypatch):
    _skip_without_kernels()
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
    m = model(preset, **overrides)
    one_call, routed_a, calls, kv_a = decode(m, True, monkeypatch)
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
    steps, routed_b, none, kv_b = decode(m, False, monkeypatch)
    for a, b in zip(one_call, steps, strict=True):
        assert torch.equal(a, b)
    assert len(routed_a) == len(routed_b)
    for a, b in zip(routed_a, routed_b, strict=True):
        assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:], strict=True))
    assert torch.equal(kv_a.k, kv_b.k) and torch.equal(kv_a.v, kv_b.v)
    assert calls == [True] * 4 * m.config.num_hidden_layers and none == []


def test_a_draft_pass_takes_the_call_for_attention_and_routes_among_resident_experts(
    monkeypatch,
):
    """A draft routes only to experts in RAM (`allowed`): the call leaves routing to it."""
    _skip_without_kernels()
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
    m = model("tiny")
    m.experts.is_resident = lambda layer, e: e % 2 == 0  # half the experts "in RAM"
    one_call, _, calls, _ = decode(m, True, monkeypatch, draft=True)
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
    steps, _, _, _ = decode(m, False, monkeypatch, draft=True)
    assert all(torch.equal(a, b) for a, b in zip(one_call, steps, strict=True))
    assert all(calls) and len(calls) == 4 * m.config.num_hidden_layers


@pytest.mark.parametrize("preset,dtype,dense,path", [
    ("tiny-olmoe", BF16, "int4", "c-int8"),  # its own q, k, v (a norm over every head)
    ("tiny-qwen2-moe", BF16, "int4", "c-int8"),  # q, k, v biases
    ("tiny", torch.float32, "int4", "c"),  # exact runs
    ("tiny", BF16, "bf16", "c-int8"),  # bf16 attention matrices
    ("tiny", BF16, "int8", "c-int8"),
    ("tiny", BF16, "int4", "tinygemm"),  # another kernel for q/k/v and o
])  # fmt: skip
def test_layers_the_call_does_not_compute_keep_the_python_path(
    preset, dtype, dense, path, monkeypatch
):
    _skip_without_kernels()
    monkeypatch.setenv("MER_DENSE_INT4_PATH", path)
    m = model(preset, dtype, dense)
    assert not any(m.decode_attention.plans)
    _, _, calls, _ = decode(m, True, monkeypatch)
    assert calls == []


def test_a_full_cache_falls_back_to_the_python_paths_error(monkeypatch):
    _skip_without_kernels()
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
    m = model("tiny")
    with pytest.raises(Exception, match="exceeds the KV cache"):
        decode(m, True, monkeypatch, capacity=5)


def test_the_decode_choice_takes_the_int8_kernel_within_what_the_call_saves():
    key, saves = ("n", "k"), dense_paths.FUSED_SAVES_MS
    totals = {"tinygemm": {key: [1.0, 1.0]}, "c-int8": {key: [1.0 + saves * 1.5] * 2},
              "c-int8-1": {key: [3.0, 3.0]}}  # fmt: skip
    paths = list(totals)
    assert dense_paths._pick_decode(totals, key, paths, calls=2) == "c-int8"
    assert dense_paths._pick_decode(totals, key, paths, calls=1) == "tinygemm"
    assert dense_paths._pick_decode(totals, key, ["tinygemm"], calls=2) == "tinygemm"


def test_a_new_thread_count_plans_the_layers_again(monkeypatch):
    """Kernel choices and thread counts are per compute-thread count: a decode after
    `torch.set_num_threads` runs on a plan made for the new count."""
    _skip_without_kernels()
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
    m = model("tiny")
    first = m.decode_attention
    assert m.decode_attention is first
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        again = m.decode_attention
        assert again is not first and again.threads == torch.get_num_threads()
        one_call, _, calls, _ = decode(m, True, monkeypatch)
        assert all(calls) and calls
    finally:
        torch.set_num_threads(threads)


def test_a_long_context_decodes_alike_past_the_first_scratch(monkeypatch):
    """Attention scores of more positions than the first scratch held (256) grow it."""
    _skip_without_kernels()
    monkeypatch.setenv("MER_DENSE_INT4_PATH", "c-int8")
    m = model("tiny", max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, m.config.vocab_size, (300,), generator=gen)
    out = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(DecodeAttention, "applies", lambda self, i: False)
        kv = m.new_kv_cache(320)
        m.forward(prompt, kv)
        out[fused] = [m.forward(torch.tensor([t]), kv) for t in (4, 8, 15)]
        if fused:
            assert m.decode_attention._local.scores.numel() >= 4 * 303
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False], strict=True))
