"""gpt-oss against transformers' GptOssForCausalLM on tiny random checkpoints saved by
transformers: sinks, sliding and full layers, biases, top-k softmax routing, the clamped
SwiGLU, YaRN; MXFP4 experts kept bit-exact from a blocks checkpoint; decode steps, paged KV
with a shared prefix, batching, speculative decoding and traces; the synth presets."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from tests.helpers import dequantized_reference, run_all
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import mer
from mer.config import ModelConfig
from mer.engine.generate import generate
from mer.engine.scheduler import Request, Scheduler
from mer.engine.speculative import SpecStats, Speculation, generate_speculative
from mer.models.paged_kv import KVPool
from mer.quant import mxfp4
from mer.quant.expert import ExpertFormat
from mer.store.convert import convert
from mer.store.reader import Store
from mer.synth.checkpoint import hf_config, write_hf_checkpoint
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files
from mer.trace.record import TraceRecorder

PROMPT = [1, 17, 93, 5, 200, 41, 41, 7, 130, 66, 2, 90]  # 12 tokens: 3x the window of 4
TOL = 1e-5  # max |ours - theirs| / max |theirs|, float32


def tiny_config(**overrides) -> GptOssConfig:
    values = dict(
        vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, sliding_window=4, swiglu_limit=1.5,
        rope_parameters=dict(rope_type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0,
                             original_max_position_embeddings=32, truncate=False,
                             rope_theta=150000.0),
    )  # fmt: skip
    values.update(overrides)
    return GptOssConfig(**values)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(checkpoint dir, model): random weights with a trained-like spread, sinks and biases
    away from 0, every value exact in bfloat16; saved by transformers (float experts)."""
    torch.manual_seed(0)
    model = GptOssForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = p * 4 if p.dim() > 1 else p + 0.1 * torch.randn_like(p)
            if name.endswith("sinks"):
                q = torch.randn_like(p)  # the init's 0.02 spread would hide them
            p.copy_(q.to(torch.bfloat16).float())
    path = tmp_path_factory.mktemp("gpt-oss") / "hf"
    model.save_pretrained(path)
    write_tokenizer_files(path, build_tokenizer(512), 256)
    return path, model


@pytest.fixture(scope="module")
def stores(hf, tmp_path_factory):
    made = {}

    def make(quant: str, src=None):
        key = (quant, str(src))
        if key not in made:
            dst = tmp_path_factory.mktemp("stores") / quant
            made[key] = convert(src or hf[0], dst, quant=quant, group_size=32, progress=False)
        return made[key]

    return make


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy_of(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def ours(store, ids, budget="64MiB"):
    m = mer.open(store, ram_budget=budget, dtype="float32")
    kv = m.transformer.new_kv_cache(len(ids))
    return m.transformer.forward(torch.tensor(ids), kv, all_logits=True), m


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def interleave(gate_up: torch.Tensor) -> torch.Tensor:
    """Ours [gate rows | up rows] [2F, H] -> the checkpoint's x @ W layout [H, 2F], gate
    and up columns interleaved."""
    f = gate_up.shape[0] // 2
    out = torch.empty_like(gate_up)
    out[0::2], out[1::2] = gate_up[:f], gate_up[f:]
    return out.t()


def store_reference(model, store_path):
    """A copy of `model` whose experts hold the store's weights, dequantized."""
    return dequantized_reference(model, store_path, interleave, lambda down: down.t())


def test_bf16_store_matches_transformers(hf, stores):
    path, model = hf
    store = stores("bf16")
    cfg = Store(store).config
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert cfg.sliding_window == 4 and cfg.rope_type == "yarn" and cfg.qkv_bias
    logits, m = ours(store, PROMPT)
    assert rel(logits, logits_of(model, PROMPT)) < TOL
    tokens = list(m.tokens(PROMPT, max_tokens=10, stop_token_ids=[-1]))
    assert tokens == greedy_of(model, PROMPT, 10)


@pytest.mark.parametrize(
    "quirk",
    ["no window", "no clamp", "no sinks", "plain rope", "no biases"],
)
def test_each_quirk_changes_the_logits_so_the_parity_test_covers_it(hf, quirk):
    """Without each quirk transformers' own logits move far beyond the tolerance: parity
    could not hold if we lacked any of them."""
    _, model = hf
    cfg = {
        "no window": tiny_config(layer_types=["full_attention"] * 4),
        "no clamp": tiny_config(swiglu_limit=1e4),
        "plain rope": tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 1.5e5}),
    }.get(quirk, tiny_config())
    other = GptOssForCausalLM(cfg).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in other.named_parameters():
            if (quirk == "no sinks" and name.endswith("sinks")) or (
                quirk == "no biases" and name.endswith(("bias", "_proj_bias"))
            ):
                p.fill_(-1e4 if name.endswith("sinks") else 0.0)
    assert rel(logits_of(other, PROMPT), logits_of(model, PROMPT)) > 100 * TOL


def test_decode_steps_equal_the_full_forward(stores):
    """Prefill 3 tokens, then one at a time past the window: each step's logits are the
    full forward's row for that position."""
    full, m = ours(stores("bf16"), PROMPT)
    t = m.transformer
    kv = t.new_kv_cache(len(PROMPT))
    steps = [t.forward(torch.tensor(PROMPT[:3]), kv, all_logits=True)]
    for tok in PROMPT[3:]:
        steps.append(t.forward(torch.tensor([tok]), kv))
    assert rel(torch.cat(steps), full) < TOL


def test_mxfp4_store_of_float_experts_matches_transformers_on_its_weights(hf, stores):
    path, model = hf
    store = stores("mxfp4")
    assert Store(store).expert_format == ExpertFormat.for_machine("mxfp4", 64, 64, bias="bfloat16")
    ref = store_reference(model, store)
    logits, m = ours(store, PROMPT)
    assert rel(logits, logits_of(ref, PROMPT)) < TOL
    assert rel(logits, logits_of(model, PROMPT)) < 0.5  # MXFP4's own error on random weights
    tokens = list(m.tokens(PROMPT, max_tokens=10, stop_token_ids=[-1]))
    assert tokens == greedy_of(ref, PROMPT, 10)


@pytest.fixture(scope="module")
def blocks_checkpoint(hf, tmp_path_factory):
    """The checkpoint as the published gpt-oss ones ship: experts as MXFP4 `*_blocks` uint8
    [E, n, k/32, 16] and `*_scales` uint8 [E, n, k/32] (rows of W [n, k] = the float
    [E, k, n] transposed, gate/up rows interleaved), biases in bfloat16."""
    from safetensors.torch import load_file, save_file

    src, _ = hf
    dst = tmp_path_factory.mktemp("gpt-oss-mxfp4") / "hf"
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name)  # [E, in, out]
        packed = [mxfp4.quantize(w[e].t().contiguous()) for e in range(w.shape[0])]
        tensors[name + "_blocks"] = torch.stack([b for b, _ in packed])
        tensors[name + "_scales"] = torch.stack([s for _, s in packed])
    for name in [n for n in tensors if n.endswith("_proj_bias")]:
        tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, dst / f.name)
    return dst, tensors


def blocks_reference(model, tensors):
    """`model` with the blocks checkpoint's experts, dequantized by transformers itself."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{proj}"
                w = convert_moe_packed_tensors(tensors[name + "_blocks"], tensors[name + "_scales"])
                getattr(layer.mlp.experts, proj).copy_(w.float())  # [E, in, out]
    return ref


def test_mxfp4_checkpoint_blocks_are_stored_bit_exact_and_match_transformers(
    hf, stores, blocks_checkpoint
):
    path, tensors = blocks_checkpoint
    store = stores("mxfp4", path)
    s = Store(store)
    raw = s.expert_path.read_bytes()
    for (layer, e), x in s.extents.items():
        parts = {
            p.name: raw[x.offset + p.offset : x.offset + p.offset + p.nbytes]
            for p in s.expert_format.parts
        }
        p = f"model.layers.{layer}.mlp.experts."
        for kind in ("blocks", "scales"):
            gu = tensors[f"{p}gate_up_proj_{kind}"][e]
            assert parts[f"gate_up.{kind}"] == torch.cat([gu[0::2], gu[1::2]]).numpy().tobytes()
            assert parts[f"down.{kind}"] == tensors[f"{p}down_proj_{kind}"][e].numpy().tobytes()
        gu_bias = tensors[p + "gate_up_proj_bias"][e]
        want = torch.cat([gu_bias[0::2], gu_bias[1::2]])
        assert parts["gate_up.bias"] == want.view(torch.uint8).numpy().tobytes()
    ref = blocks_reference(hf[1], tensors)
    logits, m = ours(store, PROMPT)
    assert rel(logits, logits_of(ref, PROMPT)) < TOL
    tokens = list(m.tokens(PROMPT, max_tokens=10, stop_token_ids=[-1]))
    assert tokens == greedy_of(ref, PROMPT, 10)
    # MXFP4 values are exact in bfloat16: a bf16 store of the blocks computes the same
    bf16, _ = ours(stores("bf16", path), PROMPT)
    assert rel(bf16, logits) < TOL


def test_mxfp4_checkpoint_into_int4_quantizes_the_exact_dequantized_values(
    hf, stores, blocks_checkpoint
):
    path, tensors = blocks_checkpoint
    store = stores("int4", path)
    ref = store_reference(hf[1], store)
    logits, m = ours(store, PROMPT)
    assert rel(logits, logits_of(ref, PROMPT)) < TOL
    assert rel(logits, logits_of(blocks_reference(hf[1], tensors), PROMPT)) < 0.5  # int4's error


def test_a_bad_mxfp4_checkpoint_is_refused_naming_the_tensor(blocks_checkpoint, tmp_path):
    from safetensors.torch import save_file

    from mer.errors import ConvertError

    path, tensors = blocks_checkpoint
    name = "model.layers.1.mlp.experts.down_proj_scales"
    for bad, match in (
        ({**tensors, name: tensors[name].float()}, f"tensor {name} has unsupported dtype F32"),
        ({k: v for k, v in tensors.items() if k != name}, f"missing tensors: {name}"),
    ):
        src = tmp_path / "bad"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(path, src)
        save_file(bad, src / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ConvertError, match=match):
            convert(src, tmp_path / "out", quant="mxfp4", progress=False)


def test_a_shared_prefix_and_a_batch_give_the_logits_of_each_sequence_alone(stores):
    """Paged KV (blocks of the window's size) with a prefix taken from the cache, and two
    sequences in one pass, against each sequence alone in a plain KV cache."""
    _, m = ours(stores("bf16"), PROMPT)
    t = m.transformer
    other = PROMPT[:9] + [300, 301, 302, 303, 304]
    alone = {}
    for ids in (PROMPT, other):
        kv = t.new_kv_cache(len(ids))
        alone[tuple(ids)] = t.forward(torch.tensor(ids), kv, all_logits=True)
    pool = KVPool(t.config, 1 << 20, t.dtype, block_size=4)
    first = pool.sequence(PROMPT)
    first.reserve(PROMPT)
    t.forward_batch([(torch.tensor(PROMPT), first)])
    first.free()
    a, b = pool.sequence(PROMPT), pool.sequence(other)
    assert (a.length, b.length) == (8, 8)  # two whole blocks each, shared
    a.reserve(PROMPT[8:])
    b.reserve(other[8:])
    both = t.forward_batch([(torch.tensor(PROMPT[8:]), a), (torch.tensor(other[8:]), b)], True)
    assert rel(both[:4], alone[tuple(PROMPT)][8:]) < TOL
    assert rel(both[4:], alone[tuple(other)][8:]) < TOL


def test_the_scheduler_batches_gpt_oss_like_each_request_alone(stores):
    m = mer.open(stores("mxfp4"), ram_budget="64MiB", dtype="float32")
    prompts = [PROMPT, PROMPT[:9] + [300, 301], [5, 6, 7, 8, 9, 10, 11]]
    alone = [m.generate(p, max_tokens=8).token_ids for p in prompts]
    s = Scheduler(m.transformer, kv_budget=4 << 20, max_batch_tokens=8)
    try:
        reqs = [Request(p, m.sampling_params(max_tokens=8)) for p in prompts]
        assert run_all(s, reqs) == alone
    finally:
        s.close()
        m.close()


def test_self_speculation_equals_plain_greedy_decoding(stores):
    """Drafting from the experts in RAM (a budget of about 6 of the 16), verified k+1
    positions at a time across sliding and full layers: the plain greedy tokens."""
    m = mer.open(stores("mxfp4"), ram_budget="48KiB", dtype="float32")
    try:
        params = m.sampling_params(max_tokens=24)
        plain = list(generate(m.transformer, PROMPT, params))
        spec = SpecStats()
        speculation = Speculation("self", k=3, adaptive=False)
        out = generate_speculative(m.transformer, speculation, PROMPT, params, spec=spec)
        assert list(out) == plain
        assert spec.rounds > 0 and 0 < spec.accepted < spec.drafted  # real rejections
    finally:
        m.close()


def test_a_trace_records_the_top_k_softmax_routing(stores):
    m = mer.open(stores("bf16"), ram_budget="64MiB", dtype="float32")
    try:
        recorder = TraceRecorder(m.config)
        m.transformer.routing_hooks.append(recorder)
        recorder.begin_sequence()
        list(m.tokens(PROMPT, max_tokens=4, stop_token_ids=[-1]))
        trace = recorder.trace()
        assert trace.experts.shape == (len(PROMPT) + 3, 4, 2)
        assert trace.n_experts == 4
        for row in trace.experts.reshape(-1, 2):
            assert row[0] != row[1]
        sums = trace.weights.astype("float32").sum(-1)
        assert abs(sums - 1).max() < 1e-3  # softmax over the chosen k
    finally:
        m.close()


def test_published_presets_have_the_published_shapes():
    for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)):
        cfg = ModelConfig.from_hf(hf_config(name))
        assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (
            layers, experts, 4)  # fmt: skip
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (2880, 2880, 64)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 8)
        assert cfg.layer_types[:2] == ("sliding_attention", "full_attention")
        assert cfg.sliding_window == 128 and cfg.rope_factor == 32.0 and not cfg.rope_truncate
        ef = ExpertFormat.for_machine("mxfp4", 2880, 2880, bias="bfloat16")
        assert cfg.num_experts_total * ef.nbytes == layers * experts * 13238272


def test_the_tiny_preset_is_a_checkpoint_transformers_loads_and_we_match(tmp_path):
    path = write_hf_checkpoint(tmp_path / "hf", hf_config("tiny-gpt-oss"), progress=False)
    model, info = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    store = convert(path, tmp_path / "bf16", quant="bf16", progress=False)
    logits, m = ours(store, PROMPT)
    assert rel(logits, logits_of(model, PROMPT)) < TOL
    assert list(m.tokens(PROMPT, max_tokens=6, stop_token_ids=[-1])) == greedy_of(model, PROMPT, 6)


def test_live_lookahead_prefetches_by_the_next_routers_bias_too(stores):
    """Router lookahead guesses with the family's routing: gpt-oss's router bias counts."""
    from mer.predict.lookahead import LookaheadPrefetcher

    class Cache:
        def __init__(self):
            self.prefetched = []

        def cancel_prefetches(self, layer, keep):
            pass

        def prefetch(self, layer, experts):
            self.prefetched.append((layer, sorted(experts)))

    m = mer.open(stores("bf16"), ram_budget="64MiB", dtype="float32")
    try:
        t, cache = m.transformer, Cache()
        hidden = torch.randn(3, 64) * 1e-3  # small, so the bias decides
        LookaheadPrefetcher(t, cache)(0, hidden, torch.zeros(3, 2, dtype=torch.long), None)
        logits = hidden @ t.w["layers.1.router"].t() + t.w["layers.1.router_bias"]
        want = sorted(set(logits.topk(2).indices.reshape(-1).tolist()))
        without_bias = sorted(
            set((hidden @ t.w["layers.1.router"].t()).topk(2).indices.view(-1).tolist())
        )
        assert cache.prefetched == [(1, want)] and want != without_bias
    finally:
        m.close()


@pytest.mark.parametrize("small", [1 << 22, 40, 80])  # 40, 80: chunks of 1 and 2 queries
def test_attention_with_sinks_matches_the_eager_formula(monkeypatch, small):
    """Against transformers' eager formula (keys repeated per group, the sink as one more
    logit, dropped after the softmax); past SMALL_ATTENTION the queries go in chunks."""
    from mer.models import layers

    monkeypatch.setattr(layers, "SMALL_ATTENTION", small)
    gen = torch.Generator().manual_seed(3)
    t, s, hq, hkv, d = 5, 9, 4, 2, 8
    q, k, v = (torch.randn(n, h, d, generator=gen) for n, h in ((t, hq), (s, hkv), (s, hkv)))
    sinks = torch.randn(hq, generator=gen)
    mask = layers.causal_mask(torch.arange(s - t, s), s, 3)
    got = layers.attention(q, k, v, mask, sinks)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scores = torch.einsum("thd,shd->hts", q, kr) * d**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat([scores, sinks[:, None, None].expand(hq, t, 1)], -1)
    probs = torch.softmax(logits, -1)[..., :s]
    want = torch.einsum("hts,shd->thd", probs, vr).reshape(t, hq * d)
    assert (got - want).abs().max() < 1e-6
