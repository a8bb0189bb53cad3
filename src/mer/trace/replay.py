"""Replays a routing trace through cache replacement policies and counts misses.

The trace becomes a stream of accesses to expert keys (layer * n_experts +
expert), grouped into steps: one layer of one token ("token" mode, as in
decoding) or one layer of a whole prompt ("prefill" mode, a prefill chunk). A
step's experts are in use together, so none of them may evict another; the
cache must hold the largest step. Policies:

- lru, lfu, ours: the policy objects of `mer.cache.policy`, the very ones the
  cache runs, driven by one replay loop (`run`, which the prefetching replay
  shares);
- belady: evicts the expert whose next use is farthest ahead: the offline
  optimum (MIN), a lower bound no online policy can beat.

Pinned experts (`pinned=`) hold their slots from their first use on and never
leave, as in the cache: the policy manages the other slots. Replay with
prefetching is `mer.trace.prefetch`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mer.cache.pinning import most_frequent
from mer.cache.policy import POLICIES as CACHE_POLICIES
from mer.cache.policy import Policy, make_policy, prefetch_accuracy
from mer.trace.format import Trace

POLICIES = (*CACHE_POLICIES, "belady")
NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Accesses:
    keys: np.ndarray  # int64 [n]: layer * n_experts + expert
    step_starts: np.ndarray  # int64 [steps + 1]
    step_layer: np.ndarray  # int64 [steps]
    n_layers: int
    n_experts: int
    top_k: int | None = None  # experts per token, where known

    @property
    def max_step(self) -> int:
        return int(np.diff(self.step_starts).max())

    def without(self, drop: np.ndarray) -> Accesses:
        """The same steps without the accesses where `drop` (bool [n]) is set."""
        kept = np.concatenate([[0], np.cumsum(~drop)]).astype(np.int64)
        return Accesses(
            self.keys[~drop],
            kept[self.step_starts],
            self.step_layer,
            self.n_layers,
            self.n_experts,
            self.top_k,
        )

    def next_use(self) -> np.ndarray:
        """For each access, the index of the next access to the same key (NEVER if none)."""
        order = np.argsort(self.keys, kind="stable")
        same = self.keys[order[1:]] == self.keys[order[:-1]]
        nxt = np.full(len(self.keys), NEVER, dtype=np.int64)
        nxt[order[:-1][same]] = order[1:][same]
        return nxt


def accesses(trace: Trace, mode: str = "token") -> Accesses:
    n_layers, n_experts = trace.n_layers, trace.n_experts
    layer_base = np.arange(n_layers, dtype=np.int64)[:, None] * n_experts
    if mode == "token":
        ex = np.sort(trace.experts.astype(np.int64), axis=-1)  # a set: order carries nothing
        keys = (ex + layer_base[None]).reshape(-1)
        k = trace.top_k
        steps = len(keys) // k
        starts = np.arange(steps + 1, dtype=np.int64) * k
        layers = np.tile(np.arange(n_layers, dtype=np.int64), trace.n_tokens)
    elif mode == "prefill":
        chunks, layers_list = [], []
        for a, b in trace.sequences():
            for m in range(n_layers):
                chunks.append(np.unique(trace.experts[a:b, m, :]).astype(np.int64) + m * n_experts)
                layers_list.append(m)
        keys = np.concatenate(chunks)
        starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        layers = np.array(layers_list, dtype=np.int64)
    else:
        raise ValueError(f"unknown replay mode {mode!r} (token or prefill)")
    return Accesses(keys, starts, layers, n_layers, n_experts, trace.top_k)


def grouped_accesses(trace: Trace, groups) -> Accesses:
    """The accesses of decoding the trace's sequences in `groups` (lists of sequence
    indices), each group together, one token of each of its live sequences per pass: one
    step per pass and layer, holding the union of their experts (what the engine's MoE
    block reads: each distinct expert of a batch once). [[0], [1], ...]: one at a time."""
    n_layers, n_experts = trace.n_layers, trace.n_experts
    chunks, layers = [], []
    for group in groups:
        bounds = [(int(trace.seq_starts[i]), int(trace.seq_starts[i + 1])) for i in group]
        for t in range(max(b - a for a, b in bounds)):
            rows = [a + t for a, b in bounds if a + t < b]
            for m in range(n_layers):
                chunks.append(np.unique(trace.experts[rows, m]).astype(np.int64) + m * n_experts)
                layers.append(m)
    starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    return Accesses(np.concatenate(chunks), starts, np.array(layers, np.int64), n_layers,
                    n_experts, trace.top_k)  # fmt: skip


def frequent_keys(acc: Accesses, n: int) -> np.ndarray:
    """The `n` most often accessed keys of a stream: a pinned set learned from it."""
    counts = np.bincount(acc.keys, minlength=acc.n_layers * acc.n_experts)
    return most_frequent(counts, n)


def split_pinned(acc: Accesses, slots: int, pinned) -> tuple[Accesses, int, int]:
    """(the stream without pinned keys, slots left to the policy, cold misses of the pins)."""
    pinned = np.asarray(sorted(pinned), dtype=np.int64)
    if len(pinned) == 0:
        return acc, slots, 0
    hit = np.isin(acc.keys, pinned)
    return acc.without(hit), slots - len(pinned), len(np.unique(acc.keys[hit]))


def simulate(acc: Accesses, policy: str, slots: int, pinned=()) -> int:
    """Misses of `policy` with `slots` expert slots over the access stream; `pinned` keys
    take slots of their own and are missed once each, at their first use."""
    acc, slots, cold = split_pinned(acc, slots, pinned)
    if slots < acc.max_step:
        raise ValueError(f"{slots} slots cannot hold one step's {acc.max_step} experts")
    if policy == "belady":
        return cold + _belady(acc, slots)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    misses, _, _ = run(acc, make_policy(policy, acc.n_layers, acc.n_experts, acc.top_k), slots)
    return cold + misses


class Clock(Protocol):
    """What `run` tells a timed replay (`mer.trace.prefetch`): a step of n experts begins,
    needs a key, has computed; a key is prefetched or evicted; and what it asks: which
    prefetches have not started when the step routes (they are cancelled)."""

    def begin(self, n: int) -> None: ...

    def need(self, key: int) -> None: ...

    def computed(self) -> None: ...

    def prefetch(self, key: int) -> None: ...

    def evict(self, key: int) -> None: ...

    def unstarted(self, keys) -> list[int]: ...


class Picker(Protocol):
    """What a replay asks a live prefetcher (`mer.trace.prefetch.LivePicks`): the step
    routed to these keys; which of these ranked candidates to prefetch for the next."""

    def routed(self, keys) -> None: ...

    def pick(self, ranked, resident) -> list[int]: ...


def run(
    acc: Accesses,
    policy: Policy,
    slots: int,
    plan: Sequence[Sequence[int]] | None = None,
    clock: Clock | None = None,
    pinned: frozenset[int] = frozenset(),
    picker: Picker | None = None,
) -> tuple[int, int, int]:
    """Replay the stream through `policy` with `slots` slots, reading after each step the
    keys `plan` lists for it where the policy lets a prefetch have a slot (with its
    accuracy so far). With a `clock`, a prefetch of the step's layer that the step does not
    use and whose read has not started is cancelled when the step routes, as the engine
    does: it frees its slot and is no read. Returns (demand misses, prefetches read,
    prefetches used). `pinned` keys stay outside the policy: each is read once, at its
    first use (a miss) or as a prefetch, and stays in RAM from then on, holding one of the
    `slots` from then on, as in the engine's cache, where a pin not loaded yet holds no
    slot and may be prefetched (pass `slots` less the pins to reserve theirs from the
    start, and a plan without them).
    With a `picker`, each step's plan is a ranked list of candidates for the next step,
    of which the picker chooses what to prefetch, as the engine's live prefetcher does."""
    misses = prefetches = useful = count = 0
    pins_read: set[int] = set()
    unused: set[int] = set()  # prefetched, not used yet
    keys, starts = acc.keys.tolist(), acc.step_starts.tolist()
    layers, n_experts = acc.step_layer.tolist(), acc.n_experts
    resident, used = policy.__contains__, policy.used  # bound once: the loop is hot

    def evict_for_demand(in_step: set[int]) -> None:
        nonlocal count
        victim = policy.victim(in_step)
        policy.evicted(victim)
        unused.discard(victim)
        count -= 1
        if clock is not None:
            clock.evict(victim)

    for s in range(len(starts) - 1):
        if s and s % acc.n_layers == 0:  # a pass: a token (token mode) or a prompt (prefill)
            policy.begin_pass()
        step, layer = keys[starts[s] : starts[s + 1]], layers[s]
        policy.visit(layer, [k - layer * n_experts for k in step if k not in pinned])
        in_step = set(step)  # in use together: none may evict another
        if picker is not None:
            picker.routed(step)
        if clock is not None:
            clock.begin(len(step))
            lo = layer * n_experts
            guessed = [k for k in unused if lo <= k < lo + n_experts and k not in in_step]
            for key in clock.unstarted(guessed):
                if key in pinned:
                    pins_read.discard(key)
                else:
                    policy.evicted(key)
                    count -= 1
                unused.discard(key)
                clock.evict(key)
                prefetches -= 1
        for key in step:
            if key in pinned:
                if key in unused:  # a prefetched pin
                    unused.discard(key)
                    useful += 1
                elif key not in pins_read:
                    pins_read.add(key)
                    misses += 1
                    if count + len(pins_read) > slots:  # the pin takes a policy slot
                        evict_for_demand(in_step)
                if clock is not None:
                    clock.need(key)
                continue
            if resident(key):
                if key in unused:
                    unused.discard(key)
                    useful += 1
            else:
                misses += 1
                if count + len(pins_read) >= slots:
                    evict_for_demand(in_step)
                policy.admitted(key)
                count += 1
            used(key)
            if clock is not None:
                clock.need(key)
        todo = plan[s] if plan is not None else ()
        if picker is not None:
            todo = picker.pick(todo, lambda k: k in policy or k in pins_read)
        for key in todo:
            if key in policy or key in pins_read:
                continue
            if count + len(pins_read) >= slots:
                accuracy = prefetch_accuracy(useful, prefetches)
                victim = policy.prefetch_victim(key, (), accuracy)
                if victim is None:
                    continue
                policy.evicted(victim)
                count -= 1
                if clock is not None:
                    clock.evict(victim)
            if key in pinned:
                pins_read.add(key)
            else:
                policy.admitted(key, prefetch=True)
                count += 1
            unused.add(key)
            prefetches += 1
            if clock is not None:
                clock.prefetch(key)
        if clock is not None:
            clock.computed()
    return misses, prefetches, useful


def _steps(acc: Accesses):
    keys = acc.keys.tolist()
    starts = acc.step_starts.tolist()
    for s in range(len(starts) - 1):
        yield s, starts[s], keys[starts[s] : starts[s + 1]]


def _belady(acc: Accesses, slots: int) -> int:
    nxt = acc.next_use().tolist()
    upcoming: dict[int, int] = {}  # resident key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped
    misses = 0
    for _, base, step in _steps(acc):
        pinned = set(step)
        for j, key in enumerate(step):
            i = base + j
            if key not in upcoming:
                misses += 1
                if len(upcoming) >= slots:
                    held = []
                    while True:
                        n, k = heapq.heappop(heap)
                        if upcoming.get(k) == -n:
                            if k in pinned:
                                held.append((n, k))
                                continue
                            del upcoming[k]
                            break
                    for h in held:
                        heapq.heappush(heap, h)
            upcoming[key] = nxt[i]
            heapq.heappush(heap, (-nxt[i], key))
        if len(heap) > 8 * slots + 1024:
            heap = [(-n, k) for k, n in upcoming.items()]
            heapq.heapify(heap)
    return misses
