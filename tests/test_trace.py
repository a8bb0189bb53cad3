"""Routing traces and their replay through cache policies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mer.cache.policy import LayerCycleScore
from mer.errors import MerError
from mer.trace.format import Trace, load_trace
from mer.trace.replay import POLICIES, accesses, simulate

SHARED_TRACE = Path(__file__).parents[2] / "shared" / "traces" / "deepseek-v2-lite-chat.npz"


def random_trace(seed: int, tokens=300, layers=4, experts=16, top_k=2, skew=1.0) -> Trace:
    """Routing with a Zipf-like preference per layer and some stickiness between tokens."""
    rng = np.random.default_rng(seed)
    pref = rng.random((layers, experts)) ** (1 + 3 * skew)
    pref /= pref.sum(1, keepdims=True)
    ex = np.empty((tokens, layers, top_k), np.int16)
    for t in range(tokens):
        for m in range(layers):
            if t and rng.random() < 0.3:
                ex[t, m] = ex[t - 1, m]
            else:
                ex[t, m] = rng.choice(experts, top_k, replace=False, p=pref[m])
    starts = np.array([0, tokens // 3, tokens], np.int64)
    return Trace(ex, starts, np.zeros(tokens, np.int8), {"n_experts": experts})


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["token", "prefill"])
def test_belady_is_a_lower_bound_on_random_traces(seed, mode):
    trace = random_trace(seed)
    acc = accesses(trace, mode)
    for slots in (acc.max_step, 12, 24, 40):
        slots = max(slots, acc.max_step)
        misses = {p: simulate(acc, p, slots) for p in POLICIES}
        assert all(misses["belady"] <= m for m in misses.values()), (slots, misses)
        # Every policy misses each distinct expert at least once, and never more than accesses.
        distinct = len(np.unique(acc.keys))
        assert all(distinct <= m <= len(acc.keys) for m in misses.values())


def test_everything_fits_means_only_cold_misses():
    trace = random_trace(1)
    acc = accesses(trace, "token")
    distinct = len(np.unique(acc.keys))
    assert {simulate(acc, p, 4 * 16) for p in POLICIES} == {distinct}


def test_lru_on_a_cycle_larger_than_the_cache_always_misses():
    # 3 layers x 1 expert each, top-1, cycled: LRU with 2 slots misses every access; Belady
    # keeps one of them and misses about half.
    ex = np.zeros((30, 3, 1), np.int16)
    trace = Trace(ex, np.array([0, 30]), np.zeros(30, np.int8), {"n_experts": 1})
    acc = accesses(trace, "token")
    assert simulate(acc, "lru", 2) == 90
    assert simulate(acc, "belady", 2) < 50


def test_reuse_chance_follows_the_routing_that_came_before():
    # Layer 0 alternates between experts 0 and 1, so their frequencies are alike; which
    # expert follows which is learned, and the one just used is the one not due next.
    score = LayerCycleScore(2, 4, top_k=1)
    for t in range(40):
        score.visit(0, [t % 2])
        score.visit(1, [2])
    assert score.follow[0] > 0.9 > 0.1 > score.follow[1]  # expert 1 came last: 0 is next
    s = score.scores(1)
    assert s[1] > s[0]  # the expert just used is given up first


def test_many_experts_chosen_together_do_not_make_the_reuse_chance_certain():
    # Eight experts always chosen together (a batch, or a prompt), the group changing one
    # visit in ten: eight votes that say one thing count as top_k votes, not eight.
    chance = {}
    for top_k in (2, None):  # None: every chosen expert counts (no top_k known)
        rng = np.random.default_rng(0)
        score, group = LayerCycleScore(1, 16, top_k=top_k), 0
        for _ in range(400):
            group = 1 - group if rng.random() < 0.1 else group
            score.visit(0, np.arange(8) + 8 * group)
        chance[top_k] = score.follow[8 * group]  # an expert of the group chosen last
    assert 0.9 < chance[2] < 0.99 and chance[None] > 0.99999


def test_ours_learns_alternating_routing_where_lru_always_misses():
    # Two layers, each alternating between two experts: four keys in a cycle. LRU with 2
    # or 3 slots misses every access; ours learns what follows what and nears Belady.
    n = 400
    ex = np.zeros((n, 2, 1), np.int16)
    ex[:, 0, 0] = np.arange(n) % 2
    ex[:, 1, 0] = 2 + np.arange(n) % 2
    trace = Trace(ex, np.array([0, n]), np.zeros(n, np.int8), {"n_experts": 4})
    acc = accesses(trace, "token")
    for slots in (2, 3):
        assert simulate(acc, "lru", slots) == 2 * n
        assert simulate(acc, "ours", slots) <= 1.05 * simulate(acc, "belady", slots)


def test_save_load_round_trip(tmp_path):
    trace = random_trace(2)
    trace.weights = np.random.default_rng(0).random(trace.experts.shape).astype(np.float16)
    trace.save(tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    assert np.array_equal(back.experts, trace.experts)
    assert np.array_equal(back.seq_starts, trace.seq_starts)
    assert np.array_equal(back.weights, trace.weights)
    assert back.meta == trace.meta
    head = back.head(150)
    assert head.n_tokens == 100 and len(head.seq_starts) == 2


def test_bad_inputs(tmp_path):
    with pytest.raises(MerError, match="no such trace"):
        load_trace(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MerError, match="not a routing trace"):
        load_trace(tmp_path / "junk.npz")
    acc = accesses(random_trace(0), "token")
    with pytest.raises(ValueError, match="cannot hold"):
        simulate(acc, "lru", 1)
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(acc, "fifo", 8)


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="shared traces not present")
def test_real_trace_loads_and_belady_bounds_it():
    trace = load_trace(SHARED_TRACE)
    assert (trace.n_layers, trace.n_experts, trace.top_k) == (26, 64, 6)
    assert trace.n_tokens == int(trace.seq_starts[-1]) == 94165
    acc = accesses(trace.head(400), "token")
    slots = 26 * 64 // 4
    misses = {p: simulate(acc, p, slots) for p in POLICIES}
    assert all(misses["belady"] <= m for m in misses.values())


def test_generation_records_a_replayable_trace(store_factory, tmp_path):
    import torch

    import mer

    model = mer.open(store_factory("bf16"), ram_budget="64MiB", dtype="float32")
    recorder = model.record_trace()
    prompts = [[1, 5, 9, 33, 77], [1, 200, 201]]
    outs = [list(model.tokens(p, max_tokens=4, stop_token_ids=[-1])) for p in prompts]
    recorder.trace().save(tmp_path / "t.npz")
    trace = load_trace(tmp_path / "t.npz")
    # Every token that went through the model: the prompt, then all generated but the last.
    assert trace.seq_starts.tolist() == [0, 5 + 3, 8 + 3 + 3]
    assert trace.phase.tolist() == [0] * 5 + [1] * 3 + [0] * 3 + [1] * 3
    assert trace.experts.shape == (14, 2, 2) and trace.weights.shape == (14, 2, 2)
    assert trace.meta["n_experts"] == 4 and trace.meta["moe_layers"] == [0, 1]
    assert trace.meta["expert_bytes"] == model.store.expert_format.nbytes
    # The recorded routing is the model's: a fresh prefill of prompt + output routes the same.
    seen = []
    model.transformer.routing_hooks = [lambda layer, h, ids, w: seen.append(ids)]
    full = prompts[0] + outs[0][:3]
    model.transformer.forward(torch.tensor(full), model.transformer.new_kv_cache(len(full)))
    expected = torch.stack(seen, 1).sort(-1).values.numpy()
    assert np.array_equal(np.sort(trace.experts[:8], -1), expected)
    distinct = len(np.unique(accesses(trace, "token").keys))
    assert all(simulate(accesses(trace, "token"), p, 4) >= distinct for p in POLICIES)


def test_routing_stats_against_random_baselines():
    from mer.trace.stats import random_overlap, random_same_first, routing_stats

    rng = np.random.default_rng(0)
    n, layers, e, k = 4000, 2, 8, 2
    ex = np.stack([rng.permutation(e)[:k] for _ in range(n * layers)]).reshape(n, layers, k)
    uniform = Trace(ex.astype(np.int16), np.array([0, n]), np.zeros(n, np.int8),
                    {"n_experts": e}, np.ones((n, layers, k), np.float16))  # fmt: skip
    for s in routing_stats(uniform):
        assert abs(s.same_first - random_same_first(e)) < 0.02
        assert abs(s.overlap - random_overlap(e, k)) < 0.03
        assert s.entropy > 0.99 and abs(s.max_share - 1 / e) < 0.02
    sticky = ex.copy()
    sticky[1::2] = sticky[0::2]  # every other token repeats its predecessor's routing
    s = routing_stats(Trace(sticky.astype(np.int16), np.array([0, n]), np.zeros(n, np.int8),
                            {"n_experts": e}, None))[0]  # fmt: skip
    assert s.same_first is None and s.overlap > 0.7
    assert abs(random_overlap(8, 2) - (1 - 15 / 28)) < 1e-12


def test_batch_dedup_between_random_and_identical_routing():
    from mer.trace.stats import batch_dedup, random_dedup

    rng = np.random.default_rng(1)
    seqs, per, layers, e, k = 40, 50, 3, 8, 2
    n = seqs * per
    ex = np.stack([rng.permutation(e)[:k] for _ in range(n * layers)]).reshape(n, layers, k)
    starts = np.arange(seqs + 1) * per
    uniform = Trace(ex.astype(np.int16), starts, np.zeros(n, np.int8), {"n_experts": e}, None)
    for b in (1, 4, 8):
        assert abs(batch_dedup(uniform, b) - random_dedup(e, k, b)) < 0.05 * random_dedup(e, k, b)
    same = np.broadcast_to(ex[:1], ex.shape).copy()  # every token routes alike
    alike = Trace(same.astype(np.int16), starts, np.zeros(n, np.int8), {"n_experts": e}, None)
    assert batch_dedup(alike, 8) == pytest.approx(8.0)
    assert random_dedup(8, 2, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="41 sequences"):
        batch_dedup(uniform, 41)
