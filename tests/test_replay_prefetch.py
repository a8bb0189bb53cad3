"""Replay with pinning and prefetching, and the cache's prefetch admission."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.test_trace import random_trace

from mer.cache.expert_cache import ExpertCache
from mer.cache.policy import LayerCycleScore
from mer.store.reader import Store
from mer.trace.format import Trace
from mer.trace.prefetch import Device, Plan, no_plan, plan, simulate_prefetch
from mer.trace.replay import POLICIES, Accesses, accesses, frequent_keys, simulate


def oracle(trace: Trace):
    """A scorer that knows the future: 1 for the experts really chosen `d` layers ahead."""
    n_layers, n_experts = trace.n_layers, trace.n_experts

    def scores(layer: int, d: int) -> np.ndarray:
        t = np.minimum(np.arange(trace.n_tokens) + (layer + d) // n_layers, trace.n_tokens - 1)
        out = np.zeros((trace.n_tokens, n_experts), np.float32)
        np.put_along_axis(out, trace.experts[t, (layer + d) % n_layers].astype(np.int64), 1, 1)
        return out

    return scores


def noise(trace: Trace, seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda layer, d: rng.random((trace.n_tokens, trace.n_experts))


def test_plan_holds_the_guesses_for_read_steps_ahead():
    trace = random_trace(0, tokens=30)  # sequences [0, 10) and [10, 30); 4 layers
    p = plan(trace, "token", oracle(trace), read_steps=2, guesses=2).per_step()
    for t in (0, 9, 12):
        for layer in range(4):
            s = t * 4 + layer
            tt, target = t + (layer + 2) // 4, (layer + 2) % 4
            if tt == 10 and t == 9:
                assert p[s] == []  # past the end of the sequence
            else:
                assert sorted(p[s]) == sorted((trace.experts[tt, target] + target * 16).tolist())
    pre = plan(trace, "prefill", oracle(trace), read_steps=1, guesses=2).per_step()
    assert len(pre) == 2 * 4 and pre[3] == [] and pre[7] == []  # no guess across prompts
    want = np.unique(trace.experts[10:30, 2]) + 2 * 16
    assert sorted(pre[4 + 1]) == want.tolist()
    with pytest.raises(ValueError, match="read steps must be 1..3"):
        plan(trace, "token", oracle(trace), read_steps=4, guesses=2)


@pytest.mark.parametrize("mode", ["token", "prefill"])
@pytest.mark.parametrize("seed", range(3))
def test_no_prefetching_reads_fewer_experts_than_belady(mode, seed):
    trace = random_trace(seed)
    acc = accesses(trace, mode)
    for scorer in (oracle(trace), noise(trace, seed)):
        for read_steps in (1, 2):
            p = plan(trace, mode, scorer, read_steps, guesses=trace.top_k)
            for slots in (max(acc.max_step, 12), max(acc.max_step, 30)):
                best = simulate(acc, "belady", slots)
                for policy in ("lru", "ours"):
                    r = simulate_prefetch(acc, policy, slots, p)
                    assert r.reads >= best, (policy, slots, r, best)
                    assert 0 <= r.useful <= r.prefetches


def test_perfect_guesses_remove_demand_misses():
    trace = random_trace(1, tokens=400)
    acc = accesses(trace, "token")
    p = plan(trace, "token", oracle(trace), read_steps=1, guesses=trace.top_k)
    for policy in ("lru", "ours"):
        plain = simulate(acc, policy, 24)
        r = simulate_prefetch(acc, policy, 24, p)
        assert r.misses < 0.3 * plain and r.useful > 0.9 * r.prefetches, (policy, plain, r)


def test_ours_admits_no_prefetch_that_evicts_a_needed_expert():
    """Every layer always routes to the same two experts and the cache holds exactly those:
    once it has seen them, random guesses never push one out."""
    ex = np.tile(np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int16), (400, 1, 1))
    trace = Trace(ex, np.array([0, 400]), np.zeros(400, np.int8), {"n_experts": 8})
    acc = accesses(trace, "token")
    guesses = plan(trace, "token", noise(trace), 1, 2)
    r = simulate_prefetch(acc, "ours", 8, guesses)
    assert r.prefetches < 10  # guesses only took slots still free in the first token
    first = Trace(ex[:3], np.array([0, 3]), np.zeros(3, np.int8), trace.meta)
    steps = 3 * 4
    head = Plan(guesses.keys[: guesses.starts[steps]], guesses.starts[: steps + 1])
    # The first three tokens' misses are all there are.
    assert simulate_prefetch(accesses(first, "token"), "ours", 8, head).misses == r.misses
    # LRU's only rule is "not used by this token", which these guesses pass: they evict.
    assert simulate_prefetch(acc, "lru", 8, guesses).misses > 400


def test_pins_in_replay_stay_and_are_read_once():
    trace = random_trace(3)
    acc = accesses(trace, "token")
    pins = frequent_keys(acc, 10)
    assert len(pins) == 10
    counts = np.bincount(acc.keys)
    assert counts[pins].min() >= np.delete(counts, pins).max()
    for policy in POLICIES:
        with_pins = simulate(acc, policy, 30, pinned=pins)
        assert with_pins >= simulate(acc, "belady", 30)
    # Pins are missed only once each: replaying pins alone costs their number of keys.
    only_pins = acc.without(~np.isin(acc.keys, pins))
    assert simulate(only_pins, "lru", 10, pinned=pins) == 10
    r = simulate_prefetch(acc, "ours", 30, plan(trace, "token", oracle(trace), 1, 2), pins)
    assert r.reads >= simulate(acc, "belady", 30)
    with pytest.raises(ValueError, match="cannot hold"):
        simulate(acc, "lru", 11, pinned=pins)  # one slot left for steps of two


def test_a_plan_for_another_stream_is_refused():
    trace = random_trace(0)
    acc = accesses(trace, "token")
    with pytest.raises(ValueError, match="another access stream"):
        simulate_prefetch(acc, "lru", 20, Plan(np.zeros(0, np.int64), np.zeros(3, np.int64)))
    with pytest.raises(ValueError, match="no prefetching replay for 'belady'"):
        simulate_prefetch(acc, "belady", 20, plan(trace, "token", oracle(trace), 1, 2))


def test_admission_compares_expected_distances():
    score = LayerCycleScore(4, 8)
    for _ in range(50):  # expert 0 of layer 1 always chosen, the others never
        for layer in range(4):
            score.visit(layer, [0])
    frequent, rare = 1 * 8 + 0, 1 * 8 + 5
    s = score.scores(0)
    assert not score.admits(0, rare, s[frequent], accuracy=0.3)
    assert score.admits(0, frequent, s[rare], accuracy=0.0)
    assert score.admits(0, rare, s[2 * 8 + 6], accuracy=0.9)  # trusted guesses beat the rare


def test_cache_prefetch_never_evicts_an_expert_worth_more(store_factory):
    store = Store(store_factory("int4"))
    cache = ExpertCache(store, 2 * store.expert_format.nbytes, policy="ours")
    with cache.use(0, 0), cache.use(0, 1):
        pass
    for _ in range(30):  # both layers always route to experts 0 and 1; layer 0 comes last
        cache.observe(1, torch.tensor([[0, 1]]))
        cache.observe(0, torch.tensor([[0, 1]]))
    cache.next_step()
    # A guess of layer 1's expert 3, never routed to: while none of 100 guesses was used,
    # it is worth less than layer 0's experts (needed again at its next visit).
    cache._guesses = 100
    assert cache.prefetch(1, [3]) == 0
    assert cache.is_resident(0, 0) and cache.is_resident(0, 1)
    # Layer 0 is routed to experts 0 and 2: the missing 2 is needed now, whatever guesses
    # are worth, and takes the slot of 1 (not of 0, routed to as well).
    cache.observe(0, torch.tensor([[0, 2]]))
    assert cache.prefetch(0, [2]) == 1
    assert cache.is_resident(0, 0) and not cache.is_resident(0, 1)
    with cache.use(0, 0), cache.use(0, 2):
        pass
    cache.next_step()
    cache._guesses_used = 100  # every guess was used: now it is worth more
    assert cache.prefetch(1, [3]) == 1
    assert cache.stats.evictions == 2


def test_cache_prefetch_never_takes_the_slot_of_an_expert_just_routed_to(store_factory):
    store = Store(store_factory("int4"))
    cache = ExpertCache(store, 2 * store.expert_format.nbytes, policy="ours")
    for _ in range(30):  # layer 0 always routes to expert 3, layer 1 to expert 0
        cache.observe(0, torch.tensor([[3]]))
        cache.observe(1, torch.tensor([[0]]))
    with cache.use(0, 0), cache.use(1, 0):
        pass
    cache.next_step()
    # Layer 0 now routes to 0 (resident, and by its past the least likely to be wanted) and
    # 3 (missing): the read of 3 must take the slot of layer 1's expert, not of 0.
    cache.observe(0, torch.tensor([[0, 3]]))
    assert cache.prefetch(0, [3]) == 1
    assert cache.is_resident(0, 0) and not cache.is_resident(1, 0)


def test_device_serves_demand_reads_first_and_cancels_unstarted_prefetches():
    d = Device(read_s=1.0, step_s=0.5)
    d.prefetch(10, now=0.0)
    d.prefetch(11, now=0.0)
    d.prefetch(12, now=0.0)
    # At t=0.5 prefetch 10 is being read (0..1); the demand read waits for it, not for 11.
    assert d.need(20, now=0.5) == 2.0
    assert d.need(11, now=0.5) == 3.0  # a waiting prefetch needed now becomes a demand read
    d.evict(12)  # never started: cancelled, it costs the device nothing
    assert d.need(21, now=3.0) == 4.0
    assert d.need(10, now=4.0) == 1.0  # read long ago


def test_timed_replay_stalls_one_read_per_miss_without_prefetch():
    trace = random_trace(2, tokens=200)
    acc = accesses(trace, "token")
    nothing = Plan(np.zeros(0, np.int64), np.zeros(len(acc.step_starts), np.int64))
    for policy in ("lru", "ours"):
        r = simulate_prefetch(acc, policy, 12, nothing, device=Device(0.003, 0.002))
        assert r.misses == simulate(acc, policy, 12)
        assert r.stall_s == pytest.approx(r.misses * 0.003)
        assert simulate_prefetch(acc, policy, 12, nothing).stall_s is None  # untimed


def test_prefetching_hides_reads_only_where_the_device_has_bandwidth_to_spare():
    trace = random_trace(1, tokens=400)
    acc = accesses(trace, "token")
    nothing = Plan(np.zeros(0, np.int64), np.zeros(len(acc.step_starts), np.int64))
    perfect = plan(trace, "token", oracle(trace), read_steps=1, guesses=trace.top_k)
    guesses = plan(trace, "token", noise(trace), read_steps=1, guesses=4)
    for policy in ("lru", "ours"):
        fast = Device(read_s=0.001, step_s=0.004)  # two reads take half a step
        plain = simulate_prefetch(acc, policy, 24, nothing, device=fast).stall_s
        assert simulate_prefetch(acc, policy, 24, perfect, device=fast).stall_s < 0.2 * plain
        slow = Device(read_s=0.004, step_s=0.001)  # each read takes four steps
        plain = simulate_prefetch(acc, policy, 24, nothing, device=slow).stall_s
        # Perfect guesses still only start the needed reads earlier...
        assert simulate_prefetch(acc, policy, 24, perfect, device=slow).stall_s <= plain
        # ...but wasted reads of random ones hold up the needed reads.
        assert simulate_prefetch(acc, policy, 24, guesses, device=slow).stall_s > plain


@pytest.mark.parametrize("name", ["lru", "lfu", "ours"])
def test_no_policy_lets_a_prefetch_take_what_the_pass_used_or_an_unused_prefetch(name):
    """The admission rule every policy object keeps, for the cache and the replays alike."""
    from mer.cache.policy import make_policy

    policy = make_policy(name, 2, 4, top_k=1)
    for key in (0, 1, 2):
        policy.admitted(key)
        policy.used(key)
    policy.begin_pass()
    policy.admitted(3, prefetch=True)  # a guess, not used yet
    policy.visit(0, [1])  # layer 0 routes to expert 1: about to be used
    policy.used(1)
    policy.used(2)  # key 2 (layer 0, expert 2) used in this pass too
    assert 3 in policy and 6 not in policy
    victim = policy.prefetch_victim(6, held=(), accuracy=1.0)
    assert victim in (None, 0)  # only key 0 is neither used in this pass nor an unused guess
    assert policy.prefetch_victim(6, held={0}, accuracy=1.0) is None
    # A demand read may take any slot that is not held.
    assert policy.victim(held={0, 1, 2}) == 3
    policy.evicted(3)
    assert 3 not in policy and policy.victim(held={0, 1, 2}) is None


def _two_steps(layers_of_steps, steps) -> Accesses:
    keys = np.array([k for step in steps for k in step], np.int64)
    starts = np.concatenate([[0], np.cumsum([len(x) for x in steps])]).astype(np.int64)
    return Accesses(keys, starts, np.array(layers_of_steps, np.int64), 2, 4, 2)


def test_a_layers_reads_overlap_its_resident_experts_compute():
    """As in the engine: the dense part, then route; the experts in RAM compute while the
    misses are read (one at a time), each missing one once it is in."""
    acc = _two_steps([0, 0], [[0, 1], [0, 2]])  # cold: two misses; then a hit and a miss
    # Step 0: routes at 1 (3 - 2 x 1 of experts); reads end at 2 and 3; waits 1, ends at 4.
    # Step 1: routes at 5; expert 0 computes 5..6 while expert 2 is read 5..6: no wait.
    overlapped = simulate_prefetch(acc, "lru", 4, no_plan(acc), device=Device(1.0, 3.0, 1.0))
    assert overlapped.misses == 3 and overlapped.stall_s == pytest.approx(1.0)
    # With no expert compute given, a step waits for all its reads: one read per miss.
    serial = simulate_prefetch(acc, "lfu", 4, no_plan(acc), device=Device(1.0, 3.0))
    assert serial.stall_s == pytest.approx(3.0)


def test_timed_replay_cancels_prefetches_not_started_when_their_layer_routes():
    acc = _two_steps([0, 1], [[0, 1], [4, 5]])
    wrong = Plan(np.array([6, 7], np.int64), np.array([0, 2, 2], np.int64))  # after step 0
    # Demand reads of step 0 end at 1.5 and 2.5; the guess 6 is read 2.5..3.5; step 1
    # routes at 3.0, before 7 started: 7 is cancelled and never read.
    timed = simulate_prefetch(acc, "lru", 8, wrong, device=Device(1.0, 0.5))
    assert timed.prefetches == 1 and timed.useful == 0
    assert simulate_prefetch(acc, "lru", 8, wrong).prefetches == 2  # untimed: no cancelling
    # Step 1's reads queue behind the guess being read (to 3.5): 4 in at 4.5, 5 at 5.5.
    assert timed.stall_s == pytest.approx(2.0 + 2.5)


def test_timed_pins_are_read_once_through_the_device():
    trace = random_trace(3)
    acc = accesses(trace, "token")
    pins = frequent_keys(acc, 10)
    device = Device(0.003, 0.004, 0.0005)
    r = simulate_prefetch(acc, "ours", 30, no_plan(acc), pins, device)
    assert r.misses == simulate(acc, "ours", 30, pinned=pins)  # counts as untimed
    assert 0 < r.stall_s < r.misses * 0.003  # overlapped with compute, never more than reads


def _one_layer(route: list[int]) -> Trace:
    ex = np.array(route, np.int16).reshape(-1, 1, 1)
    starts = np.array([0, len(route)], np.int64)
    return Trace(ex, starts, np.zeros(len(route), np.int8), {"n_experts": 8})


def test_timed_pins_hold_a_slot_only_once_read_as_in_the_engine():
    # Two slots, expert 0 pinned but first used at the end: until then experts 1 and 2
    # both stay (the engine's cache reserves nothing for a pin not loaded yet).
    acc = accesses(_one_layer([1, 2, 1, 2, 1, 2, 0, 1, 2]), "token")
    device = Device(read_s=0.001, step_s=0.004)
    r = simulate_prefetch(acc, "lru", 2, no_plan(acc), [0], device)
    assert r.misses == 2 + 1 + 2  # 1 and 2 once, the pin, then 1 and 2 share one slot
    # Untimed, the pin's slot is its own from the start (what bench cache tabulates).
    assert simulate(acc, "lru", 2, pinned=[0]) == 1 + 8


def test_a_pin_not_loaded_yet_may_be_prefetched_and_is_then_held():
    acc = accesses(_one_layer([1, 2, 1, 0, 1, 0]), "token")
    guesses = [[], [], [0], [], [], []]  # after the third token: expert 0, the pin
    todo = Plan(np.array([0], np.int64), np.array([0, 0, 0, 1, 1, 1, 1], np.int64))
    assert todo.per_step() == guesses
    device = Device(read_s=0.001, step_s=0.004)
    r = simulate_prefetch(acc, "lru", 3, todo, [0], device)
    assert (r.misses, r.prefetches, r.useful) == (2, 1, 1)  # the pin's first use hit
    assert r.stall_s == pytest.approx(2 * 0.001)  # only the two demand reads waited


def test_replay_picks_live_guesses_as_the_engine_does():
    """A ranked plan replayed with the live rule: guesses from ranks whose measured
    precision is too low are not read; good ones are, at most `guesses` a step."""
    trace = random_trace(1, tokens=400)
    acc = accesses(trace, "token")
    device = Device(read_s=0.001, step_s=0.004)
    bad = plan(trace, "token", noise(trace), read_steps=1, guesses=4, ranked=True)
    blind = simulate_prefetch(acc, "ours", 24, bad, device=device, live=(4, 0.0))
    gated = simulate_prefetch(acc, "ours", 24, bad, device=device, live=(4, 0.5))
    assert gated.prefetches < 0.1 * blind.prefetches
    good = plan(trace, "token", oracle(trace), read_steps=1, guesses=4, ranked=True)
    sure = simulate_prefetch(acc, "ours", 24, good, device=device, live=(2, 0.5))
    assert sure.useful >= 0.9 * sure.prefetches > 0
    steps = len(acc.step_starts) - 1
    assert sure.prefetches <= 2 * steps
