"""Pinned experts: never evicted once loaded, within their share, from a file or automatic;
tokens do not depend on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.test_cache import PROMPT, computes_as_read, touch

import mer.api
from mer.cache.expert_cache import ExpertCache
from mer.cache.pinning import FIRST_AUTO_PIN_PASS, pin_capacity
from mer.errors import BudgetError, ConfigError
from mer.store.reader import Store
from mer.trace.format import Trace
from mer.trace.pins import read_pin_file

ALL = [(layer, e) for layer in (0, 1) for e in range(4)]  # the tiny model's 8 experts


def small_cache(store_path, slots: int, **kw) -> ExpertCache:
    store = Store(store_path)
    if isinstance(kw.get("pins"), Path):  # a pin file, read as `mer.open` reads it
        kw["pins"] = read_pin_file(kw["pins"], store.config, kw.get("pin_share", 0.0))
    return ExpertCache(store, slots * store.expert_format.nbytes, **kw)


@pytest.mark.parametrize("policy", ["lru", "ours"])
def test_pinned_experts_are_never_evicted_at_minimum_size(store_factory, policy):
    """Two pins plus top-2 slots: every other access evicts, pins stay and are read once."""
    pins = [(0, 3), (1, 0)]
    cache = small_cache(store_factory("int4"), 4, policy=policy, pins=pins)
    rng = np.random.default_rng(0)
    loaded = set()
    for _ in range(60):
        layer, e = ALL[rng.integers(len(ALL))]
        if policy == "ours":
            cache.observe(layer, torch.tensor([[e]]))
        touch(cache, (layer, e))
        loaded |= {(layer, e)} & set(pins)
        assert all(cache.is_resident(*k) for k in loaded)  # a pin stays from its first use on
    touch(cache, *pins)
    s = cache.stats
    assert s.evictions > 20 and s.pinned == 2
    assert all(cache.is_resident(*k) for k in pins)
    # Cold misses only for the pins: replaying them now costs nothing.
    before = s.misses
    touch(cache, *pins, *pins)
    assert cache.stats.misses == before


def test_in_use_expert_is_never_evicted_with_pins(store_factory):
    cache = small_cache(store_factory("int4"), 3, pins=[(1, 1)])
    touch(cache, (1, 1))
    held = cache.acquire(0, 0)
    touch(cache, (0, 1), (0, 2), (0, 3), (1, 0), (1, 2))  # all through the one slot left
    assert cache.is_resident(0, 0) and cache.is_resident(1, 1)
    assert cache.stats.evictions == 4
    assert computes_as_read(held, cache.store.path, (0, 0))
    cache.release(0, 0)


def test_a_finished_prefetch_of_a_pin_is_kept_not_cancelled(store_factory):
    """A pin prefetched and read but not used yet is resident, not a read to cancel: a demand
    read that finds every other slot in use gets the budget error (it crashed reaching into
    the finished read)."""
    cache = small_cache(store_factory("int4"), 3, pins=[(0, 0)])
    assert cache.prefetch(0, [0]) == 1
    request = cache._entries[(0, 0)].request
    request.wait()
    held = [cache.acquire(1, 0), cache.acquire(1, 1)]
    with pytest.raises(BudgetError, match="all 3 expert slots are in use"):
        cache.acquire(1, 2)
    assert cache.is_resident(0, 0) and all(w is not None for w in held)
    cache.release(1, 0)
    touch(cache, (1, 2))  # a slot came free: no pin is pushed out for it
    assert cache.is_resident(0, 0)


def test_pins_leave_one_tokens_worth_of_slots():
    assert pin_capacity(10, 0.5, 2) == 5
    assert pin_capacity(10, 0.9, 2) == 8  # not 9: one token's two experts must fit
    assert pin_capacity(2, 0.9, 2) == 0
    with pytest.raises(ConfigError, match="--pin-share must be between 0 and 0.9, got 1.5"):
        pin_capacity(10, 1.5, 2)


def test_automatic_pins_follow_the_most_acquired_experts(store_factory):
    cache = small_cache(store_factory("int4"), 6, pin_share=0.5)  # 3 pins, 3 free slots
    assert cache.pinned == frozenset()
    hot = [(0, 2), (1, 1), (1, 3)]
    for step in range(FIRST_AUTO_PIN_PASS):
        touch(cache, *hot, ALL[step % len(ALL)])
        cache.next_step()
    assert cache.pinned == frozenset(hot)
    for _ in range(3):  # cycling the cold ones through the other slots evicts none of the pins
        touch(cache, *[k for k in ALL if k not in hot])
    assert all(cache.is_resident(*k) for k in hot) and cache.stats.pinned == 3


@pytest.mark.parametrize("how", ["auto", "json", "trace"])
def test_tokens_identical_with_and_without_pinning(store_factory, tmp_path, how):
    store = store_factory("int4")
    nbytes = Store(store).expert_format.nbytes
    kw = {"pin_share": 0.5}
    if how == "json":
        (tmp_path / "pins.json").write_text(json.dumps([[0, 1], [1, 2]]))
        kw = {"pin_file": tmp_path / "pins.json"}
    elif how == "trace":
        ex = np.array([[[1, 2], [0, 3]]] * 5 + [[[1, 0], [3, 2]]] * 3, np.int16)
        Trace(ex, np.array([0, 8]), np.zeros(8, np.int8), {"n_experts": 4}).save(tmp_path / "t.npz")
        kw = {"pin_file": tmp_path / "t.npz", "pin_share": 0.4}  # 2 of 5 slots: (0,1), (1,3)
    sample = dict(max_tokens=40, temperature=0.8, seed=3, stop_token_ids=[-1])
    pinned = mer.api.open(store, ram_budget=5 * nbytes, **kw)
    got = list(pinned.tokens(PROMPT, **sample))
    plain = mer.api.open(store, ram_budget=5 * nbytes)
    assert got == list(plain.tokens(PROMPT, **sample))
    stats = pinned.stats().cache
    assert stats.pinned == 2 and stats.evictions > 0
    if how == "trace":
        assert pinned.cache.pinned == {(0, 1), (1, 3)}


@pytest.mark.parametrize(
    "content, share, message",
    [
        (None, 0.0, "no such pin file"),
        ("{not json", 0.0, "not a JSON list"),
        ('{"a": 1}', 0.0, "not a JSON list"),
        ("[[0, 1, 2]]", 0.0, "is not a [layer, expert] pair"),
        ("[[0, 9]]", 0.0, "no expert 9 at layer 0"),
        ("[[5, 0]]", 0.0, "no expert 0 at layer 5"),
        (json.dumps(ALL[:4]), 0.0, "pins 4 experts, but the budget leaves room for 3"),
        (json.dumps(ALL[:2]), 0.2, "pins 2 experts, but the budget leaves room for 1"),
    ],
)
def test_bad_pin_files_are_one_line_errors(store_factory, tmp_path, content, share, message):
    path = tmp_path / "pins.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        small_cache(store_factory("int4"), 5, pins=path, pin_share=share)
    assert message in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_trace_pin_files(store_factory, tmp_path):
    path = tmp_path / "t.npz"
    ex = np.zeros((4, 3, 2), np.int16)  # three MoE layers: not this model's two
    Trace(ex, np.array([0, 4]), np.zeros(4, np.int8), {"n_experts": 4}).save(path)
    with pytest.raises(ConfigError, match="needs --pin-share"):
        small_cache(store_factory("int4"), 5, pins=path)
    with pytest.raises(ConfigError, match="trace of 3 MoE layers x 4 experts, the model has 2 x 4"):
        small_cache(store_factory("int4"), 5, pins=path, pin_share=0.2)
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a routing trace"):
        small_cache(store_factory("int4"), 5, pins=tmp_path / "bad.npz", pin_share=0.2)


def test_cli_bad_pin_share_is_one_line(store_factory):
    from tests.test_cli import mer

    proc = mer("generate", "--store", store_factory("int4"), "--prompt", "x",
               "--pin-share", "0.95", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --pin-share must be between 0 and 0.9, got 0.95"
