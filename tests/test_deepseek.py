"""DeepSeek beyond the shared family runner (test_families.py): its routers against the
reference routers, and multi-head latent attention:
the low-rank query, decode steps through the compressed cache, the compressed cache against
full K/V, the paged pool with prefix sharing and batching, the continuous-batching
scheduler and self-speculation, all on a tiny checkpoint saved by transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.helpers import run_all
from tests.test_families import deepseek_v2

import mer
from mer.config import ModelConfig
from mer.engine.generate import generate
from mer.engine.scheduler import Request, Scheduler
from mer.engine.speculative import SpecStats, Speculation, generate_speculative
from mer.models.kv_cache import KVCache
from mer.models.paged_kv import KVPool
from mer.models.transformer import MoETransformer
from mer.store.convert import convert
from mer.store.reader import Store
from mer.synth.checkpoint import hf_config
from mer.synth.tokenizer import build_tokenizer, write_tokenizer_files

PROMPT = [1, 17, 93, 5, 200, 41, 41, 7, 130, 66, 2, 90]
TOLERANCE = 1e-5  # max |ours - reference| / max |reference|, float32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A DeepSeek-V2 with a low-rank query (q_lora_rank 16) and its bf16 store."""
    torch.manual_seed(1)
    model = deepseek_v2(q_lora_rank=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            q = p * 4 if p.dim() > 1 else p + 0.1 * torch.randn_like(p)
            p.copy_(q.to(torch.bfloat16).float())
    path = tmp_path_factory.mktemp("deepseek") / "hf"
    model.save_pretrained(path)
    write_tokenizer_files(path, build_tokenizer(512), 256)
    store = convert(path, path.parent / "bf16", quant="bf16", progress=False)
    return model, store


@pytest.fixture(scope="module")
def ours(checkpoint):
    m = mer.open(checkpoint[1], ram_budget="64MiB", dtype="float32")
    yield m
    m.close()


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_low_rank_query_matches_transformers(checkpoint, ours):
    model, _ = checkpoint
    assert ours.config.q_lora_rank == 16 and ours.config.rope_scaling["rope_type"] == "yarn"
    kv = ours.transformer.new_kv_cache(len(PROMPT))
    logits = ours.transformer.forward(torch.tensor(PROMPT), kv, all_logits=True)
    assert rel(logits, reference(model, PROMPT)) < TOLERANCE
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False)[0, len(PROMPT):].tolist()  # fmt: skip
    assert list(ours.tokens(PROMPT, max_tokens=10, stop_token_ids=[-1])) == out


def test_decode_steps_through_the_latent_cache_match_the_full_forward(checkpoint, ours):
    t = ours.transformer
    kv = t.new_kv_cache(len(PROMPT))
    logits = [t.forward(torch.tensor(PROMPT[:5]), kv, all_logits=True)]
    logits += [t.forward(torch.tensor([tok]), kv) for tok in PROMPT[5:]]
    assert rel(torch.cat(logits), reference(checkpoint[0], PROMPT)) < TOLERANCE


def test_the_latent_cache_decodes_as_full_keys_and_values(checkpoint, ours):
    latent = ours.transformer
    cfg = latent.config
    full = MoETransformer(
        dataclasses.replace(cfg, mla_cache="full"),
        Store(checkpoint[1]).load_dense(),
        latent.experts,
        torch.float32,
    )
    n = len(PROMPT) + 8
    kv_latent, kv_full = latent.new_kv_cache(n), full.new_kv_cache(n)
    a = latent.forward(torch.tensor(PROMPT), kv_latent, all_logits=True)
    b = full.forward(torch.tensor(PROMPT), kv_full, all_logits=True)
    assert rel(a, b) < TOLERANCE
    tok_a = tok_b = int(a[-1].argmax())
    for _ in range(8):
        a, b = (
            latent.forward(torch.tensor([tok_a]), kv_latent),
            full.forward(torch.tensor([tok_b]), kv_full),
        )
        assert rel(a, b) < TOLERANCE
        tok_a, tok_b = int(a[-1].argmax()), int(b[-1].argmax())
        assert tok_a == tok_b
    # What each caches per token and layer: the latent and the rope key, or K and V per head.
    per_token = {
        name: (kv.k[0, 0].numel() + kv.v[0, 0].numel())
        for name, kv in (("latent", kv_latent), ("full", kv_full))
    }
    heads = cfg.num_attention_heads
    assert per_token == {
        "latent": cfg.kv_lora_rank + cfg.qk_rope_head_dim,  # 32 + 8
        "full": heads * (cfg.qk_head_dim + cfg.v_head_dim),  # 4 x (24 + 20)
    }


def test_deepseek_v2_lite_caches_a_ninth_of_full_keys_and_values():
    cfg = ModelConfig.from_hf(hf_config("deepseek-v2-lite"))
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.dense_layers) == (64, 6, (0,))
    assert (cfg.intermediate_size, cfg.shared_expert_intermediate_size) == (1408, 2816)
    latent = KVCache(cfg, 1, torch.bfloat16)
    full = KVCache(dataclasses.replace(cfg, mla_cache="full"), 1, torch.bfloat16)
    latent_bytes = latent.k.nbytes + latent.v.nbytes
    full_bytes = full.k.nbytes + full.v.nbytes
    assert latent_bytes == 27 * (512 + 64) * 2 == 31_104  # bf16 bytes per token, all layers
    assert full_bytes == 27 * 16 * (192 + 128) * 2 == 276_480
    pool = KVPool(cfg, 64 << 20, torch.bfloat16)
    assert pool.block_bytes == 16 * latent_bytes


def test_the_paged_pool_shares_latent_prefixes_and_batches(ours):
    t = ours.transformer
    pool = KVPool(ours.config, 1 << 20, t.dtype, block_size=4)
    prompt = list(range(5, 5 + 23))
    first = pool.sequence(prompt)
    first.reserve(prompt)
    full = t.forward_batch([(torch.tensor(prompt), first)])
    first.free()
    again = pool.sequence(prompt)
    assert again.length == 20  # five whole blocks of latents reused
    rest = prompt[again.length :]
    again.reserve(rest)
    reused = t.forward_batch([(torch.tensor(rest), again)])
    assert rel(reused, full) < TOLERANCE
    again.free()
    # Two sequences in one pass equal each alone.
    other = [9, 8, 7, 6, 5]
    seqs = [pool.sequence(p) for p in (prompt, other)]
    for s, p in zip(seqs, (prompt, other), strict=True):
        s.reserve(p[s.length :])
    both = t.forward_batch(
        [(torch.tensor(p[s.length :]), s) for s, p in zip(seqs, (prompt, other), strict=True)]
    )
    alone = t.forward(torch.tensor(other), t.new_kv_cache(len(other)))
    assert rel(both[1:], alone) < TOLERANCE and rel(both[:1], full) < TOLERANCE
    for s in seqs:
        s.free()


def test_the_scheduler_and_self_speculation_keep_the_output(ours):
    prompts = [PROMPT, PROMPT[:7] + [300, 301], [1, 5, 9, 13]]
    params = ours.sampling_params(max_tokens=8)
    alone = [list(generate(ours.transformer, p, params)) for p in prompts]
    s = Scheduler(ours.transformer, kv_budget=1 << 20, max_batch_tokens=16)
    try:
        reqs = [Request(p, ours.sampling_params(max_tokens=8)) for p in prompts]
        assert run_all(s, reqs) == alone
    finally:
        s.close()
    spec = SpecStats()
    out = generate_speculative(
        ours.transformer, Speculation("self", k=3), PROMPT, params, spec=spec
    )
    assert list(out) == alone[0] and spec.drafted > 0


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_routing_matches_the_reference_router_and_a_draft_keeps_to_resident_experts(version):
    """V2: group-limited softmax top-k; V3: sigmoid, the bias chooses but does not weight,
    groups by their top-2 sum, renormalised; both times routed_scaling_factor."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from mer.models.layers import route_grouped

    torch.manual_seed(0)
    common = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                  topk_group=2, routed_scaling_factor=2.5)  # fmt: skip
    if version == "v2":
        router = DeepseekV2TopkRouter(
            DeepseekV2Config(**common, topk_method="group_limited_greedy")
        )
        kwargs = dict(scoring="softmax", group_score="max")
    else:
        router = DeepseekV3TopkRouter(DeepseekV3Config(**common, norm_topk_prob=True))
        router.e_score_correction_bias.copy_(0.5 * torch.randn(16))
        kwargs = dict(scoring="sigmoid", group_score="top2", renormalise=True,
                      bias=router.e_score_correction_bias)  # fmt: skip
    router.weight.data.normal_()
    x = torch.randn(50, 32)
    with torch.no_grad():
        _, ref_w, ref_ids = router(x)
    w, ids = route_grouped(x, router.weight, 4, n_group=4, topk_group=2, scale=2.5, **kwargs)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order))
    allowed = torch.arange(16) % 3 == 0
    w, ids = route_grouped(x, router.weight, 4, n_group=4, topk_group=2, allowed=allowed, **kwargs)
    assert allowed[ids].all() and ids.shape == (50, 4)


def test_a_trace_records_the_moe_layers_routing(checkpoint, tmp_path):
    from mer.trace.format import load_trace

    with mer.open(checkpoint[1], ram_budget="64MiB", dtype="float32") as m:
        recorder = m.record_trace()
        out = list(m.tokens(PROMPT, max_tokens=4, stop_token_ids=[-1]))
        recorder.trace().save(tmp_path / "t.npz")
    trace = load_trace(tmp_path / "t.npz")
    n = len(PROMPT) + len(out) - 1
    assert trace.experts.shape == (n, 2, 3)  # layers 1 and 2 (0 is dense), top 3
    # V2's weights: softmax scores, not renormalised, times routed_scaling_factor 1.5
    assert (trace.weights.sum(-1) < 1.5 + 1e-4).all() and (trace.weights > 0).all()
