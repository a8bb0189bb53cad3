"""The expert cache: LRU order, in-use protection, counters, and results independent of it."""

from __future__ import annotations

import numpy as np
import pytest

import mer.api
from mer.cache.expert_cache import ExpertCache
from mer.errors import BudgetError
from mer.io.direct import DirectReader
from mer.io.engine import ReadEngine
from mer.store.reader import Store
from mer.trace.replay import Accesses, simulate

PROMPT = [1, 17, 93, 5, 200, 41, 41, 7, 130, 66]


def cache_with(store_path, slots: int, direct: bool = True) -> ExpertCache:
    store = Store(store_path)
    return ExpertCache(store, slots * store.expert_format.nbytes, direct=direct)


def touch(cache, *keys):
    for k in keys:
        with cache.use(*k):
            pass


def computes_as_read(weights, store_path, key) -> bool:
    """Whether `weights` still compute what a fresh read of expert `key` computes: its slot
    was not given to another expert while it was held."""
    import torch

    fresh = cache_with(store_path, slots=2)
    x = torch.randn(3, fresh.store.config.hidden_size, dtype=torch.bfloat16)
    with fresh.use(*key) as ref:
        return torch.equal(weights(x), ref(x))


def test_lru_eviction_and_counters(store_factory):
    cache = cache_with(store_factory("int4"), slots=3)
    touch(cache, (0, 0), (0, 1), (0, 2))
    touch(cache, (0, 0))  # (0, 1) is now least recent
    touch(cache, (1, 0))
    assert not cache.is_resident(0, 1)
    assert all(cache.is_resident(*k) for k in [(0, 0), (0, 2), (1, 0)])
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 4, 1)
    assert s.bytes_read == 4 * cache.format.nbytes
    assert s.read_seconds > 0


def test_in_use_expert_is_never_evicted(store_factory):
    cache = cache_with(store_factory("int4"), slots=2)
    held = cache.acquire(0, 0)
    touch(cache, (0, 1), (0, 2), (0, 3), (1, 0))  # cycles through the one free slot
    assert cache.is_resident(0, 0)
    cache.acquire(1, 1)
    with pytest.raises(BudgetError) as e:
        cache.acquire(1, 2)  # both slots pinned
    assert "in use" in str(e.value)
    assert computes_as_read(held, cache.store.path, (0, 0))
    cache.release(0, 0)
    cache.release(1, 1)
    touch(cache, (1, 2))


def test_a_layers_resident_experts_are_held_at_once_or_not_at_all(store_factory):
    """`acquire_resident` (a decode step's experts under one lock): every one held and
    counted as a hit where all are in RAM; where one is not, None and nothing held or read."""
    cache = cache_with(store_factory("int4"), slots=3)
    touch(cache, (0, 0), (0, 1))
    s = cache.stats
    hits, misses = s.hits, s.misses
    held = cache.acquire_resident(0, [0, 1])
    assert held is not None and len(held) == 2
    assert (cache.stats.hits, cache.stats.misses) == (hits + 2, misses)
    assert computes_as_read(held[1], store_factory("int4"), (0, 1))
    touch(cache, (0, 2), (0, 3), (1, 0))  # the one free slot cycles; both held stay
    assert cache.is_resident(0, 0) and cache.is_resident(0, 1)
    cache.release_all(0, [0, 1])
    assert cache.acquire_resident(0, [0, 3]) is None  # (0, 3) was evicted: nothing held
    assert cache.stats.misses == misses + 3 and not cache.is_resident(0, 3)
    touch(cache, (0, 3), (0, 2), (1, 1))  # everything evictable again
    assert not cache.is_resident(0, 0)
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release_all(0, [3, 3])


def test_a_wrapper_that_changes_the_experts_is_never_bypassed(store_factory):
    """The MoE block holds a layer's resident experts at once only through the provider's own
    `acquire_resident`: a wrapper that passes attributes through to the cache but yields
    other callables (gpt-oss's activation, a benchmark's timers) keeps its callables."""
    import contextlib

    import torch

    from mer.models.layers import moe

    cache = cache_with(store_factory("int4"), slots=4)
    touch(cache, (0, 0), (0, 1), (0, 2))

    class Doubled:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        @contextlib.contextmanager
        def use(self, layer, expert):
            with self.inner.use(layer, expert) as ffn:
                yield lambda x: ffn(x) * 2

    x = torch.randn(1, cache.store.config.hidden_size).bfloat16()
    weights, ids = torch.tensor([[0.7, 0.3]]), torch.tensor([[2, 0]])
    assert torch.equal(moe(x, weights, ids, 0, Doubled(cache)), 2 * moe(x, weights, ids, 0, cache))


def test_reads_are_direct(store_factory):
    cache = cache_with(store_factory("int4"), slots=2)
    assert cache.reader.direct  # the test temp dir is on a filesystem that allows O_DIRECT


@pytest.mark.parametrize("direct", [True, False])
def test_tokens_independent_of_budget(store_factory, direct):
    """Every expert resident vs two experts per layer: identical greedy and sampled tokens."""
    store = store_factory("int4")
    n_layers = Store(store).config.num_hidden_layers
    outs = {}
    for slots in (100, 2 * n_layers):
        model = mer.api.open(
            store, ram_budget=slots * Store(store).expert_format.nbytes, direct_io=direct
        )
        greedy = list(model.tokens(PROMPT, max_tokens=16, stop_token_ids=[-1]))
        sampled = list(
            model.tokens(
                PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=7, stop_token_ids=[-1]
            )
        )
        outs[slots] = (greedy, sampled, model.cache.stats)
    (g1, s1, st1), (g2, s2, st2) = outs.values()
    assert g1 == g2 and s1 == s2
    assert st2.misses > st1.misses  # the small cache really did read experts again
    assert st1.evictions == 0 and st2.evictions > 0


def test_filesystem_without_o_direct_falls_back_once(store_factory, monkeypatch):
    """A filesystem that refuses O_DIRECT (as tmpfs may) gets one warning, then buffered reads."""
    import errno
    import os

    import mer.io.direct as direct

    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(direct, "_warned_paths", set())
    store = Store(store_factory("int4"))
    with pytest.warns(UserWarning, match="refuses O_DIRECT") as record:
        a = DirectReader(store.expert_path)
        b = DirectReader(store.expert_path)
    assert len(record) == 1 and not a.direct and not b.direct
    cache = ExpertCache(store, 4 * store.expert_format.nbytes, ReadEngine(a))
    touch(cache, (0, 0), (1, 3))
    assert cache.stats.misses == 2


@pytest.mark.parametrize("policy", ["lru", "lfu", "ours"])
def test_tokens_identical_with_every_policy(store_factory, policy):
    store = store_factory("int4")
    nbytes = Store(store).expert_format.nbytes
    small = mer.api.open(store, ram_budget=3 * nbytes, cache_policy=policy)
    got = list(small.tokens(PROMPT, max_tokens=16, temperature=0.8, seed=4, stop_token_ids=[-1]))
    full = mer.api.open(store, ram_budget="64MiB")
    want = list(full.tokens(PROMPT, max_tokens=16, temperature=0.8, seed=4, stop_token_ids=[-1]))
    assert got == want and small.stats().cache.evictions > 0


def replay_in_cache(store: Store, policy: str, slots: int, steps) -> tuple[int, int]:
    """Misses of the real cache and of the replay simulator on the same steps ((MoE layer
    ordinal, sorted experts)), the cache driven as the model drives it: routing observed,
    resident experts held first, then the missing ones read."""
    import torch

    cfg = store.config
    n_layers, n_experts, k = len(cfg.moe_layers), cfg.num_local_experts, cfg.num_experts_per_tok
    cache = ExpertCache(store, slots * store.expert_format.nbytes, policy=policy)
    for m, step in steps:
        layer = cfg.moe_layers[m]
        cache.observe(layer, torch.tensor([step]))
        step = sorted(step, key=lambda e: not cache.is_resident(layer, e))
        held = [cache.acquire(layer, e) for e in step]
        assert all(w is not None for w in held)
        for e in step:
            cache.release(layer, e)
        if m == n_layers - 1:
            cache.next_step()
    keys = np.array([m * n_experts + e for m, step in steps for e in step])
    layers = np.array([m for m, _ in steps])
    acc = Accesses(keys, np.arange(0, len(keys) + 1, k), layers, n_layers, n_experts, k)
    return cache.stats.misses, simulate(acc, policy, slots)


def test_lfu_evicts_the_least_acquired_and_matches_the_replay(store_factory):
    store = Store(store_factory("int4"))
    cache = ExpertCache(store, 3 * store.expert_format.nbytes, policy="lfu")
    touch(cache, (0, 0), (0, 0), (0, 0), (0, 1), (0, 1), (0, 2))
    touch(cache, (1, 0))  # (0, 2) was acquired once: the fewest
    assert not cache.is_resident(0, 2)
    assert all(cache.is_resident(*k) for k in [(0, 0), (0, 1), (1, 0)])
    # The cache and the replay simulator count the same misses on the same stream.
    rng = np.random.default_rng(0)
    n_experts = store.config.num_local_experts
    steps = [(i % 2, sorted(int(e) for e in rng.choice(n_experts, 2, replace=False)))
             for i in range(200)]  # fmt: skip
    got, want = replay_in_cache(store, "lfu", 4, steps)
    assert got == want


@pytest.mark.parametrize("slots", [3, 5])
def test_the_cache_misses_what_the_replay_simulator_counts(store_factory, slots):
    """`mer bench cache` claims to measure what the cache does: drive the real cache with a
    sticky routing stream as the model would."""
    store = Store(store_factory("int4"))
    cfg = store.config
    n_layers, n_experts, k = len(cfg.moe_layers), cfg.num_local_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(3)
    steps, last = [], [rng.choice(n_experts, k, replace=False) for _ in range(n_layers)]
    for i in range(600):
        m = i % n_layers
        if rng.random() < 0.5:  # else the layer repeats its last choice
            last[m] = rng.choice(n_experts, k, replace=False)
        steps.append((m, sorted(int(e) for e in last[m])))
    got, want = replay_in_cache(store, "ours", slots, steps)
    assert got == want  # scores do not depend on the order within a step
    got, want = replay_in_cache(store, "lru", slots, steps)
    assert abs(got - want) <= 0.01 * want  # holding resident experts first reorders recency


def test_ours_never_evicts_an_expert_in_use(store_factory):
    store = Store(store_factory("int4"))
    cache = ExpertCache(store, 3 * store.expert_format.nbytes, policy="ours")
    import torch

    cache.observe(0, torch.tensor([[0, 1]]))
    held = cache.acquire(0, 0)
    for layer, e in [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (0, 3)]:
        cache.observe(layer, torch.tensor([[e, e]]))
        touch(cache, (layer, e))
        assert cache.is_resident(0, 0)
    assert computes_as_read(held, store.path, (0, 0))
    cache.release(0, 0)


def test_unknown_policy_is_a_clear_error(store_factory):
    from mer.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown cache policy 'mru'"):
        mer.api.open(store_factory("int4"), ram_budget="64MiB", cache_policy="mru")


@pytest.mark.parametrize("prefetch", [False, True])
def test_counters_add_up_to_the_bytes_read(trained_store, prefetch):
    """Every read is a miss or a prefetch: a layer's missing experts, read together ahead of
    their acquires, are misses, not prefetches, and never count as hits."""
    model = mer.open(trained_store, ram_budget="1MiB", prefetch=prefetch)
    model.generate("import os\n", max_tokens=16)
    s = model.cache.stats
    extent = model.store.extent(0, 0).length
    reads = s.misses + s.prefetches - s.prefetches_cancelled
    assert s.bytes_read == reads * extent
    assert (s.prefetches > 0) == prefetch
    assert s.prefetches_used <= s.prefetches
    model.close()


def test_reads_issued_ahead_and_never_acquired_are_ordinary_entries_after_the_pass(small_store):
    """A pass that fetched a layer's experts and failed before acquiring them leaves them as
    any resident expert: evictable, and a later acquire is a hit."""
    model = mer.open(small_store, ram_budget="64MiB", prefetch=False)
    try:
        cache = model.cache
        assert cache.fetch(1, [0, 1]) == 2
        misses = cache.stats.misses
        assert all(cache._entries[(1, e)].ahead for e in (0, 1))
        cache.next_step()
        assert not any(entry.ahead for entry in cache._entries.values())
        hits = cache.stats.hits
        with cache.use(1, 0):
            pass
        assert (cache.stats.hits, cache.stats.misses) == (hits + 1, misses)
    finally:
        model.close()
