"""Replay with prefetching: a predictor's guesses are read ahead of use, as the cache would.

After each step (one layer of one token; in prefill mode one layer of one prompt)
the experts predicted for the step `read_steps` later are read into the cache
where a slot can be had under the admission rule of the policy object the cache
runs (`mer.cache.policy`; the replay loop is `mer.trace.replay.run`): never from an
expert the current pass (token, or prompt) has used nor from an unused prefetch;
under LRU only from the least recent expert, under ours only from one expected to be
needed later than the expert it brings. A read takes `read_steps` layer-steps, so
a prefetch issued that far ahead arrives just in time: guessing further ahead is
harder, and a guess made later would arrive late, so the plan holds exactly the
guesses for `read_steps` ahead. In prefill mode nothing is prefetched across
prompts (the next prompt's tokens are unknown).

Counted: demand misses (accesses that found their expert absent and waited for a
read), prefetch reads, and the prefetches used before being evicted; the rest
were wasted reads. Every read, demand or prefetch, moves an expert's bytes, and
no prefetching can make the total fall below Belady's misses.

Counted so, the prefetches of one step are independent reads that overlap: a
device of unbounded bandwidth. Given a `Device` (a read's time at the device's
bandwidth, a step's compute time, and how much of it is expert FFNs), the replay
also keeps time as the engine spends it (`mer.models.layers.moe`): a step first
computes its dense part (attention, router) and then routes; its demand reads are
issued then, served one at a time ahead of prefetches still waiting; the experts
already in compute first, and each missing one computes as soon as it is in and
the one before it is done, so a layer's reads overlap its resident experts'
compute; the time it waits is its stall. A prefetch is issued when the layer
before its target routes, and one not started by the time its layer routes to
other experts is cancelled (`mer.predict.live`). Prefetches then pay only if the
device has bandwidth to spare, as on a real SSD: wasted reads delay the useful ones.
With no expert compute given (`expert_s` 0), a step waits for all its reads
before it computes at all: every miss stalls one full read on an idle device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mer.cache.policy import make_policy
from mer.cache.precision import RankPrecision
from mer.trace.format import Trace
from mer.trace.replay import Accesses, run, split_pinned

PREFETCH_POLICIES = ("lru", "ours")
# (source layer, distance) -> scores [tokens, n_experts] of the trace (mer.predict.Predictor)
Scorer = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class Plan:
    """Expert keys to prefetch at the end of each step: keys[starts[s]:starts[s + 1]]."""

    keys: np.ndarray  # int64
    starts: np.ndarray  # int64 [steps + 1]

    def per_step(self) -> list[list[int]]:
        keys = self.keys.tolist()
        starts = self.starts.tolist()
        return [keys[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


@dataclass(frozen=True)
class PrefetchResult:
    misses: int  # demand misses, pins' first reads included
    prefetches: int  # prefetch reads
    useful: int  # prefetched experts used before eviction
    stall_s: float | None = None  # time steps waited for reads, with a Device

    @property
    def wasted(self) -> int:
        return self.prefetches - self.useful

    @property
    def reads(self) -> int:
        return self.misses + self.prefetches


@dataclass
class Device:
    """A device that reads one expert in `read_s` seconds, one read at a time (its bandwidth
    is the limit, not how many reads are queued), and a model whose every step computes
    for `step_s` seconds, of which `expert_s` per expert of the step is expert FFNs (the
    part that overlaps the step's own reads; the rest comes before it routes). Demand
    reads are served before waiting prefetches (never before the read being served); a
    prefetch evicted or cancelled before its read starts costs nothing."""

    read_s: float
    step_s: float
    expert_s: float = 0.0
    busy_until: float = 0.0  # when the read being served (or the last one) ends
    busy_s: float = 0.0  # read time of every read started so far
    waiting: OrderedDict = field(default_factory=OrderedDict)  # key -> issue time, FIFO
    ready: dict = field(default_factory=dict)  # key -> when its bytes are in

    def _start_waiting(self, now: float) -> None:
        """Start, in order, the waiting prefetches the device reached before `now`."""
        while self.waiting:
            key, issued = next(iter(self.waiting.items()))
            start = max(self.busy_until, issued)
            if start >= now:
                return
            del self.waiting[key]
            self.busy_until = self.ready[key] = start + self.read_s
            self.busy_s += self.read_s

    def need(self, key: int, now: float) -> float:
        """When an expert a step uses at `now` is in: a new demand read, a waiting prefetch
        promoted to one, or a read already started (or done)."""
        self._start_waiting(now)
        if key in self.waiting:
            del self.waiting[key]
        elif key in self.ready:
            return self.ready[key]
        self.busy_until = self.ready[key] = max(self.busy_until, now) + self.read_s
        self.busy_s += self.read_s
        return self.ready[key]

    def prefetch(self, key: int, now: float) -> None:
        self.waiting[key] = now

    def evict(self, key: int) -> None:
        self.waiting.pop(key, None)
        self.ready.pop(key, None)

    def unstarted(self, keys, now: float) -> list[int]:
        """Of `keys`, the prefetches whose reads have not started by `now`."""
        self._start_waiting(now)
        return [k for k in keys if k in self.waiting]


class _Clock:
    """A replay's time on a Device (or none): the step being run and its stall so far."""

    def __init__(self, device: Device | None) -> None:
        self.device, self.now, self.stall = device, 0.0, 0.0
        self._routed = 0.0  # when the current step routes: its demand reads start
        self._ready: list[float] = []  # when each of the step's experts is in

    def begin(self, n: int) -> None:
        """A step of `n` experts begins: its dense part computes, then it routes."""
        self._ready = []
        if self.device is not None:
            d = self.device
            self._routed = self.now + max(0.0, d.step_s - n * d.expert_s)

    def need(self, key: int) -> None:
        if self.device is not None:
            self._ready.append(self.device.need(key, self._routed))

    def computed(self) -> None:
        """The step's experts have run, those in RAM first, each missing one once it is in
        and the one before is done; the step stalled for the time it waited."""
        if self.device is None:
            return
        t, expert_s = self._routed, self.device.expert_s
        for ready in sorted(self._ready):
            if ready > t:
                self.stall += ready - t
                t = ready
            t += expert_s
        self.now = t

    def prefetch(self, key: int) -> None:
        if self.device is not None:
            self.device.prefetch(key, self._routed)

    def evict(self, key: int) -> None:
        if self.device is not None:
            self.device.evict(key)

    def unstarted(self, keys) -> list[int]:
        """Of the prefetches `keys`, those not started when the step routes (cancellable)."""
        if self.device is None:
            return []
        return self.device.unstarted(keys, self._routed)


def plan(
    trace: Trace, mode: str, scorer: Scorer, read_steps: int, guesses: int, ranked: bool = False
) -> Plan:
    """The top-`guesses` experts each token is predicted to route to `read_steps` layers
    ahead, as keys per step of `accesses(trace, mode)` (a prompt's guesses united); with
    `ranked` (token mode), best first."""
    n_layers, n_experts = trace.n_layers, trace.n_experts
    if not 1 <= read_steps < n_layers:
        raise ValueError(f"read steps must be 1..{n_layers - 1} (layers), got {read_steps}")
    seq_end = np.repeat(trace.seq_starts[1:], np.diff(trace.seq_starts))  # [T]
    tokens = np.arange(trace.n_tokens)
    per_layer = []
    for layer in range(n_layers):
        target = layer + read_steps
        top = top_experts(scorer(layer, read_steps), guesses, ranked)  # [T, g]
        keys = top + (target % n_layers) * n_experts
        keys[tokens + target // n_layers >= seq_end] = -1  # the target is past the sequence
        per_layer.append(keys)
    if mode == "token":
        keys = np.stack(per_layer, 1).reshape(trace.n_tokens * n_layers, guesses)  # [steps, g]
        counts = (keys >= 0).sum(1)
        flat = keys[keys >= 0]
    elif mode == "prefill":
        chunks = []
        for a, b in trace.sequences():
            for layer in range(n_layers):
                if layer + read_steps < n_layers:
                    chunks.append(np.unique(per_layer[layer][a:b]))
                else:
                    chunks.append(np.zeros(0, np.int64))
        counts = np.array([len(c) for c in chunks])
        flat = np.concatenate(chunks)
    else:
        raise ValueError(f"unknown replay mode {mode!r} (token or prefill)")
    return Plan(flat.astype(np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def top_experts(scores: np.ndarray, n: int, ranked: bool = False) -> np.ndarray:
    """Indices of each row's `n` highest scores, int64 [rows, n] (in no particular order;
    with `ranked`, best first)."""
    n = min(n, scores.shape[1])
    if ranked:
        return np.argsort(-scores, axis=1, kind="stable")[:, :n].astype(np.int64)
    return np.argpartition(-scores, n - 1, axis=1)[:, :n].astype(np.int64)


class LivePicks:
    """The engine's live prefetch rule (`mer.predict.live`) in a timed replay of a ranked
    plan one layer ahead: up to `guesses` candidates not in the cache, from the ranks whose
    precision, measured as the replay runs, pays on the device's busy share so far."""

    def __init__(self, clock: _Clock, guesses: int, ranks: int, min_precision=None) -> None:
        self.clock, self.guesses = clock, guesses
        self.ranks = RankPrecision(ranks, min_precision)
        self._ranked: list[int] | None = None  # the candidates for the step about to run

    def routed(self, keys) -> None:
        if self._ranked:
            self.ranks.score(self._ranked, keys)
        self._ranked = None

    def pick(self, ranked, resident) -> list[int]:
        self._ranked = list(ranked)
        device, now = self.clock.device, self.clock._routed
        busy = device.busy_s / now if device is not None and now > 0 else 0.0
        return self.ranks.pick(self._ranked, resident, self.guesses, busy)


def simulate_prefetch(
    acc: Accesses,
    policy: str,
    slots: int,
    prefetch: Plan,
    pinned=(),
    device: Device | None = None,
    live: tuple[int, float | None] | None = None,
) -> PrefetchResult:
    """Replay of `policy` with `slots` slots that also reads the planned prefetches; with a
    `device`, also the time steps stall on reads (a pin's first read stalls as a miss).
    `live` = (guesses, min_precision): the plan is ranked candidates one layer ahead, of
    which the engine's live rule picks (`LivePicks`; needs a device)."""
    if len(prefetch.starts) != len(acc.step_starts):
        raise ValueError("the prefetch plan was made for another access stream")
    if len(prefetch.keys) and policy not in PREFETCH_POLICIES:
        raise ValueError(
            f"no prefetching replay for {policy!r} (choose from {', '.join(PREFETCH_POLICIES)})"
        )
    rest, free, cold = split_pinned(acc, slots, pinned)
    if free < rest.max_step:
        raise ValueError(f"{free} slots cannot hold one step's {rest.max_step} experts")
    steps = prefetch.per_step()
    replay = make_policy(policy, acc.n_layers, acc.n_experts, acc.top_k)
    if device is None:
        pins = {int(k) for k in pinned}
        steps = [[k for k in keys if k not in pins] for keys in steps]
        misses, prefetches, useful = run(rest, replay, free, steps)
        return PrefetchResult(cold + misses, prefetches, useful)
    # The replay runs on an idle device of the same speeds: `device` itself is not changed.
    # Pins go through it too: a pin's first read is timed as any miss or prefetch, and
    # from then on it holds a slot (the engine's cache reserves none for a pin not loaded
    # yet, and its prefetcher may guess one).
    clock = _Clock(Device(device.read_s, device.step_s, device.expert_s))
    picker = None
    if live is not None:
        guesses, min_precision = live
        ranks = int(np.diff(prefetch.starts).max(initial=0))
        picker = LivePicks(clock, guesses, max(ranks, 1), min_precision)
    pins = frozenset(int(k) for k in pinned)
    misses, prefetches, useful = run(acc, replay, slots, steps, clock, pins, picker)
    return PrefetchResult(misses, prefetches, useful, clock.stall)


def no_plan(acc: Accesses) -> Plan:
    """A plan that prefetches nothing: `simulate_prefetch` then times plain demand reads
    (any cache policy)."""
    return Plan(np.zeros(0, np.int64), np.zeros(len(acc.step_starts), np.int64))
