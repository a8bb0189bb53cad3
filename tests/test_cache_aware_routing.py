"""Cache-aware routing (`mer.models.routing`): exact stays exact; the opt-in rule keeps the
top-1, picks only resident experts within the slack, keeps the weights' sum, and gives the
same output for the same prompt and resident set."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tests.conftest import memory_model

import mer
from mer.models.routing import ROUTINGS, CacheAwareRouting, cache_aware
from mer.options import ROUTINGS as CLI_ROUTINGS


def _routed(seed: int, t: int = 64, e: int = 8, k: int = 2):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(t, e, generator=gen) * 2, -1)
    top, ids = torch.topk(scores, k, -1)
    resident = torch.rand(e, generator=gen) < 0.5
    return scores, top / top.sum(-1, keepdim=True), ids, resident


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("slack", [0.0, 0.05, 0.2, 1.0])
def test_the_rule_keeps_top1_stays_within_the_slack_and_sums_to_one(seed, slack):
    scores, weights, ids, resident = _routed(seed, k=3 if seed % 2 else 2)
    new_w, new_ids, sub, dropped = cache_aware(scores, weights, ids, resident, slack, slack)
    assert torch.equal(new_ids[:, 0], ids[:, 0])  # the top-1 is always used
    assert torch.allclose(new_w.sum(-1), torch.ones(len(ids)), atol=1e-6)
    n_sub = n_drop = 0
    for r in range(len(ids)):
        picks, s = ids[r].tolist(), scores[r]
        missing = [e for e in picks[1:] if not resident[e]]
        if not missing:  # nothing to change: the family's weights, bit for bit
            assert torch.equal(new_w[r], weights[r]) and torch.equal(new_ids[r], ids[r])
            continue
        used = [e for e, w in zip(new_ids[r].tolist(), new_w[r].tolist(), strict=True) if w > 0]
        assert len(used) == len(set(used))  # no expert twice
        zero = [j for j, w in enumerate(new_w[r].tolist()) if w == 0]
        assert all(new_ids[r, j] == ids[r, 0] for j in zero)  # a dropped pick: top-1, weight 0
        for e in used:
            if e in picks:
                continue
            n_sub += 1  # a substitute: resident, within the slack of a pick it replaced
            assert resident[e]
            assert any(s[e] >= s[m] - slack for m in missing)
        n_drop += len(zero)
        # the weights of what remains are the router's scores, renormalised
        kept = torch.tensor(used)
        assert torch.allclose(new_w[r, : len(used)], s[kept] / s[kept].sum(), atol=1e-6)
    assert (n_sub, n_drop) == (sub, dropped)


def test_an_all_resident_layer_changes_nothing():
    scores, weights, ids, _ = _routed(0)
    everything = torch.ones(scores.shape[1], dtype=torch.bool)
    new_w, new_ids, sub, dropped = cache_aware(scores, weights, ids, everything, 0.5, 0.5)
    assert new_w is weights and new_ids is ids and sub == dropped == 0


def test_exact_routing_is_bit_identical_and_all_resident_cache_aware_too():
    m = memory_model(num_hidden_layers=2)
    tokens = torch.arange(1, 13)
    exact = m.forward(tokens, m.new_kv_cache(16), all_logits=True)
    assert m.routing is None  # exact is the default: the family's routing, untouched
    m.routing = CacheAwareRouting(slack=0.3)
    aware = m.forward(tokens, m.new_kv_cache(16), all_logits=True)
    assert torch.equal(exact, aware)  # every expert resident: nothing to change
    assert m.routing.stats.substituted == m.routing.stats.dropped == 0


def test_cache_aware_reads_only_what_it_chose():
    m = memory_model(num_hidden_layers=2)
    n = m.config.num_local_experts
    m.experts.resident = {(i, e) for i in m.config.moe_layers for e in range(n // 2)}
    m.routing = CacheAwareRouting(slack=1.0)  # any resident expert may stand in; drop the rest
    routed = []
    m.routing_hooks.append(lambda i, h, ids, w: routed.append((ids.clone(), w.clone())))
    out = m.forward(torch.arange(1, 9), m.new_kv_cache(8), all_logits=True)
    assert torch.isfinite(out).all()
    for ids, w in routed:  # with slack 1 only the top-1 may be outside the resident half
        assert (ids[:, 1:][w[:, 1:] > 0] < n // 2).all()
        assert torch.allclose(w.sum(-1), torch.ones(len(w)))
    top1 = set()
    for (ids, _), i in zip(routed, m.config.moe_layers, strict=True):
        top1 |= {(i, int(e)) for e in ids[:, 0]}
    assert set(m.experts.acquired) <= m.experts.resident | top1


def test_exact_via_open_is_the_default(store_factory):
    store = store_factory("int4")
    a = mer.open(store, ram_budget="64MiB", dtype="float32").generate("ab", max_tokens=8)
    b = mer.open(store, ram_budget="64MiB", dtype="float32", routing="exact").generate(
        "ab", max_tokens=8
    )
    assert a.token_ids == b.token_ids


def test_same_prompt_same_resident_set_same_output(trained_store):
    """A cold cache of 8 slots, demand reads only, twice: the same routing and text."""
    snippet = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    outs, stats = [], []
    for _ in range(2):
        nbytes = mer.open(trained_store, ram_budget="64MiB").store.expert_format.nbytes
        model = mer.open(trained_store, ram_budget=8 * nbytes, prefetch=False,
                         routing="cache-aware", routing_slack=0.3)  # fmt: skip
        outs.append(model.generate(snippet, max_tokens=24).token_ids)
        stats.append(model.stats().routing)
        model.close()
    assert outs[0] == outs[1]
    assert stats[0] == stats[1] and stats[0].substituted > 0


def test_a_read_in_flight_counts_as_resident(store_factory):
    """The fixed rule: resident from the moment its read is issued, finished or not (what
    the cache calls held; `is_resident`, read whole, is what the MoE block runs now)."""
    model = mer.open(store_factory("int4"), ram_budget="64MiB", prefetch=False)
    cache = model.cache
    assert not cache.is_held(0, 3)
    assert cache.prefetch(0, [3]) == 1
    assert cache.is_held(0, 3)  # checked before waiting for the read
    assert bool(model.transformer._resident(0, held=True)[3])
    with cache.use(0, 3):
        assert cache.is_held(0, 3) and cache.is_resident(0, 3)
    model.close()


def test_bad_routing_is_one_line(store_factory):
    assert CLI_ROUTINGS == ROUTINGS
    with pytest.raises(mer.errors.ConfigError, match="routing"):
        mer.open(store_factory("int4"), routing="nearest")
    with pytest.raises(mer.errors.ConfigError, match="slack"):
        mer.open(store_factory("int4"), routing="cache-aware", routing_slack=-1)
    proc = subprocess.run(
        [sys.executable, "-m", "mer.cli", "generate", "--store", str(store_factory("int4")),
         "--prompt", "x", "--routing", "cache-aware", "--routing-slack", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "--routing-slack" in proc.stderr


def test_generate_counts_substitutions_on_the_stats_line(store_factory):
    store = store_factory("int4")
    budget = 2 * mer.open(store).store.expert_format.nbytes  # two experts: top-2 of one layer
    proc = subprocess.run(
        [sys.executable, "-m", "mer.cli", "generate", "--store", str(store),
         "--prompt", "ab", "--max-tokens", "8", "--ram-budget", str(budget), "--routing",
         "cache-aware", "--routing-slack", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cache-aware routing:" in proc.stderr and "substituted" in proc.stderr


def test_bench_quality_prints_its_table(trained_store):
    proc = subprocess.run(
        [sys.executable, "-m", "mer.cli", "bench", "quality", "--store", str(trained_store),
         "--tokens", "24", "--window", "12", "--residency", "0.25", "--slacks", "0.2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "exact, Belady" in out and "cache-aware" in out and "reads/token" in out


@pytest.mark.parametrize(
    "preset", ["tiny", "tiny-qwen2-moe", "tiny-deepseek-v2", "tiny-deepseek-v3", "tiny-glm-4.5"]
)
def test_router_scores_are_what_each_familys_weights_are_made_of(preset):
    """The rule reweights from `router_scores`: for every family, the chosen experts'
    scores are proportional to the weights its own routing gives them."""
    m = memory_model(preset)
    h = torch.randn(16, m.config.hidden_size, generator=torch.Generator().manual_seed(1))
    i = m.config.moe_layers[0]
    weights, ids = m.family.route(m, i, h, None)
    scores = m.family.router_scores(m, i, h).gather(1, ids)
    ratio = weights / scores
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)


def test_metrics_count_what_cache_aware_routing_changed(store_factory):
    from mer.serve.metrics import render_metrics
    from mer.store.reader import Store

    store = store_factory("int4")
    budget = 2 * Store(store).expert_format.nbytes  # two experts: top-2 of one layer
    with mer.open(store, ram_budget=budget, routing="cache-aware", routing_slack=0.5) as m:
        m.generate("ab", max_tokens=8, stop_token_ids=[-1])
        rows = dict(
            line.split() for line in render_metrics(m, m.scheduler("1MiB"), 0).splitlines()
            if not line.startswith("#")
        )  # fmt: skip
        stats = m.transformer.routing.stats
        assert float(rows["mer_routing_substituted_total"]) == stats.substituted
        assert float(rows["mer_routing_dropped_total"]) == stats.dropped
        assert stats.substituted + stats.dropped > 0  # a tiny cache: the rule had work to do
