"""The expert cache: (layer, expert) -> a slot holding its bytes, filled by the read engine.

Invariants: an expert in use (acquired and not yet released) is never
evicted, and neither is one whose read is in flight; a slot holds the bytes
of at most one expert, usable only after they were read whole and passed
their checksum; at most one read per expert is in flight, later requests
wait on it; a failed read leaves the cache as if it had never been asked.
Eviction and prefetch admission follow a policy object (`mer.cache.policy`: LRU; LFU,
the fewest acquires so far; or ours, the expected distance to next use, learned from the
routing the model reports through `observe`), the same object the trace replays run: the
cache tells it what happens and excludes what must stay (in use, being read, pinned).
Prefetches fill free slots or take one the policy admits them to. Pinned
experts (`mer.cache.pinning`: given as keys, or chosen from the counts of acquires) are
never evicted once loaded; they take at most a share of the slots. Counters record what
happened, never estimates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from mer.cache.pinning import MAX_SHARE, AutoPins, Pins, check_pins, pin_capacity
from mer.cache.policy import POLICIES, make_policy, prefetch_accuracy
from mer.cache.pool import SlotPool
from mer.errors import BudgetError, ConfigError
from mer.io.direct import DirectReader
from mer.io.engine import DEMAND, PREFETCH, ReadEngine, ReadRequest
from mer.quant.expert import ExpertWeights
from mer.store import format as fmt
from mer.store.reader import Store

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    hits: int = 0  # acquired with no new read: resident, or already being read
    misses: int = 0  # acquired by issuing a demand read
    evictions: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0  # wall time with reads in flight
    stall_seconds: float = 0.0  # time acquire() waited for reads
    prefetches: int = 0
    prefetches_used: int = 0  # acquired before being evicted
    prefetches_cancelled: int = 0
    pinned: int = 0  # pinned experts resident now (never evicted)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def read_bandwidth(self) -> float:
        return self.bytes_read / self.read_seconds if self.read_seconds else 0.0


@dataclass(eq=False)
class _Entry:
    slot: int
    users: int = 0
    weights: ExpertWeights | None = None
    request: ReadRequest | None = None  # while its read is in flight
    prefetched: bool = False  # read by a prefetch and not acquired yet
    guess: bool = False  # that prefetch was a prediction (of a layer not being routed)
    ahead: bool = False  # a demand read started by `fetch`, not acquired yet


class ExpertCache:
    def __init__(
        self,
        store: Store,
        budget_bytes: int,
        engine: ReadEngine | None = None,
        verify: bool = True,
        threads: int = 4,
        direct: bool = True,
        policy: str = "lru",
        pin_share: float = 0.0,
        pins: Pins | Sequence[Key] | None = None,
    ) -> None:
        """`pins`: experts to pin (`mer.cache.pinning.Pins`, or (layer, expert) pairs);
        without them, `pin_share` > 0 pins the most acquired experts automatically."""
        if policy not in POLICIES:
            raise ConfigError(
                f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})"
            )
        self.store = store
        self.format = store.expert_format
        cfg = store.config
        self.pool = SlotPool(
            self.format.nbytes,
            budget_bytes,
            min_slots=cfg.num_experts_per_tok,
            max_slots=cfg.num_experts_total,  # more could never be used
            what=f"one token at one layer (top-{cfg.num_experts_per_tok})",
        )
        self.engine = engine or ReadEngine(DirectReader(store.expert_path, direct), threads)
        self.verify = verify
        self._stats = CacheStats()
        self.step = 0  # advanced by the model once per forward pass
        self._entries: dict[Key, _Entry] = {}  # resident, or being read
        self._free = list(range(self.pool.n_slots - 1, -1, -1))
        self._lock = threading.Lock()
        self.policy = policy
        self._layers = cfg.moe_layers
        self._ordinal = {layer: j for j, layer in enumerate(cfg.moe_layers)}
        self._n_experts = cfg.num_local_experts
        # Sees the same keys as `_entries`, as ints (`_index`): told of every change under
        # the lock.
        self._policy = make_policy(
            policy, len(cfg.moe_layers), cfg.num_local_experts, cfg.num_experts_per_tok
        )
        # Predictions prefetched (less those cancelled) and used: their accuracy weighs a
        # guess in admission. Reads of the layer being routed, issued ahead, are not guesses.
        self._guesses = self._guesses_used = 0
        self._pinned: set[Key] = set()
        # Keys that were in use or being read at some point since they were last found
        # idle: a superset of those held now, so choosing a victim checks only these (and
        # the pins) rather than every entry, ~0.2 ms a choice at 800 slots.
        self._busy: set[Key] = set()
        # Prefetches whose read has not ended: what a cancel looks through, not every entry.
        self._prefetching: dict[Key, _Entry] = {}
        # Keys whose entry is `ahead`: what a pass's end resets, not every entry (a Python loop
        # over a whole model's experts, every token).
        self._ahead: set[Key] = set()
        self._auto_pins: AutoPins | None = None
        self._setup_pins(pin_share, pins)

    def _setup_pins(self, share: float, pins: Pins | Sequence[Key] | None) -> None:
        cfg = self.store.config
        if pins is not None and not isinstance(pins, Pins):
            pins = Pins(tuple(pins))
        if pins is not None and pins.ranked:
            self._pinned = set(
                pins.keys[: pin_capacity(self.n_slots, share, cfg.num_experts_per_tok)]
            )
        elif pins is not None:
            capacity = pin_capacity(self.n_slots, share or MAX_SHARE, cfg.num_experts_per_tok)
            self._pinned = set(check_pins(list(pins.keys), cfg, capacity, pins.where))
        elif capacity := pin_capacity(self.n_slots, share, cfg.num_experts_per_tok):
            self._auto_pins = AutoPins(cfg.moe_layers, cfg.num_local_experts, capacity)

    @property
    def pinned(self) -> frozenset[Key]:
        """The experts pinned now (each stays once loaded; some may not be loaded yet)."""
        return frozenset(self._pinned)

    def observe(self, layer: int, ids, weights=None) -> None:
        """Routing of a MoE layer (ids [T, k]): feeds the eviction policy. The experts it
        routed to are about to be acquired: no prefetch may take their slots."""
        chosen = ids.unique().tolist()
        with self._lock:
            self._policy.visit(self._ordinal[layer], chosen)

    @property
    def n_slots(self) -> int:
        return self.pool.n_slots

    @property
    def reader(self) -> DirectReader:
        return self.engine.reader

    def is_resident(self, layer: int, expert: int) -> bool:
        """In RAM now: read whole (an expert still being read is not)."""
        entry = self._entries.get((layer, expert))
        return entry is not None and entry.request is None

    def holds_every_expert(self) -> bool:
        """Every expert of the model read or being read: no prefetch can add anything."""
        return len(self._entries) == len(self._layers) * self._n_experts

    def is_held(self, layer: int, expert: int) -> bool:
        """Read whole or being read: what cache-aware routing counts as resident, so that
        its choice does not depend on how far a read has got."""
        return (layer, expert) in self._entries

    def next_step(self) -> None:
        self.step += 1
        with self._lock:
            self._policy.begin_pass()
            for key in self._ahead:  # never acquired (the pass failed): ordinary entries
                entry = self._entries.get(key)
                if entry is not None:
                    entry.ahead = False
            self._ahead.clear()
        if self._auto_pins is not None and self._auto_pins.due(self.step):
            with self._lock:
                # Unpinned experts simply become evictable; new pins stay once loaded.
                self._pinned = self._auto_pins.choose()

    def acquire(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's weights, read from the store if needed; pinned until `release`."""
        key = (layer, expert)
        if self._auto_pins is not None:
            with self._lock:
                self._auto_pins.count(layer, expert)
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._hold(key, entry)
                elif (slot := self._take_slot(for_prefetch=False)) is not None:
                    entry = self._start_read(key, slot, DEMAND)
                    self._stats.misses += 1
                    self._hold(key, entry, counted=True)
                if entry is not None:
                    request = entry.request
                    break
                blocker = self._prefetch_in_flight()
            blocker.wait_quietly()  # every slot is held by prefetches being read: wait for one
        if request is not None:
            self.engine.promote(request)
            t0 = time.perf_counter()
            try:
                request.wait()
            except BaseException:
                self.release(layer, expert)
                raise
            finally:
                with self._lock:
                    self._stats.stall_seconds += time.perf_counter() - t0
        return entry.weights

    def _hold(self, key: Key, entry, counted: bool = False) -> None:
        """Under the lock: `entry` held from here on, in the same locked section that found
        it, so no other acquire can evict it first; a hit counted unless its miss was
        (`counted`, or `fetch` started its read)."""
        if entry.ahead:
            entry.ahead = False
            self._ahead.discard(key)
        elif not counted:
            self._stats.hits += 1
            if entry.prefetched:
                entry.prefetched = False
                self._stats.prefetches_used += 1
                self._guesses_used += entry.guess
        entry.users += 1
        self._busy.add(key)
        self._policy.used(self._index(key))

    def acquire_resident(self, layer: int, experts) -> list[ExpertWeights] | None:
        """All of `experts` held at once, under one lock, if every one is in RAM now (as many
        `acquire`s would, without their per-call cost: a decode step holds a layer's experts
        so); else None and nothing held. Release them with `release_all`."""
        with self._lock:
            keys = [(layer, e) for e in experts]
            entries = [self._entries.get(key) for key in keys]
            if any(entry is None or entry.request is not None for entry in entries):
                return None
            if self._auto_pins is not None:
                for e in experts:
                    self._auto_pins.count(layer, e)
            for key, entry in zip(keys, entries, strict=True):
                self._hold(key, entry)
        return [entry.weights for entry in entries]

    def release_all(self, layer: int, experts) -> None:
        with self._lock:
            for e in experts:
                self._release(layer, e)

    def release(self, layer: int, expert: int) -> None:
        with self._lock:
            self._release(layer, expert)

    def _release(self, layer: int, expert: int) -> None:
        entry = self._entries.get((layer, expert))
        if entry is None:  # its read failed and it was dropped
            return
        if entry.users <= 0:
            raise RuntimeError(f"expert {(layer, expert)} released more often than acquired")
        entry.users -= 1

    @contextmanager
    def use(self, layer: int, expert: int):
        weights = self.acquire(layer, expert)
        try:
            yield weights
        finally:
            self.release(layer, expert)

    def fetch(self, layer: int, experts) -> int:
        """Start the reads of experts this forward pass is about to acquire, so that they run
        in parallel rather than one acquire after another. Each is a miss; its slot is held
        until it is acquired (or the pass ends). Takes only slots to be had without waiting;
        returns how many reads were started."""
        started = 0
        with self._lock:
            for e in experts:
                key = (layer, int(e))
                if key in self._entries:
                    continue
                slot = self._take_slot(for_prefetch=False)
                if slot is None:
                    break
                self._start_read(key, slot, DEMAND).ahead = True
                self._ahead.add(key)
                self._stats.misses += 1
                started += 1
        return started

    def prefetch(self, layer: int, experts) -> int:
        """Start reading experts expected soon, where a slot can be had cheaply. Returns how
        many reads were started."""
        started = 0
        with self._lock:
            for e in experts:
                key = (layer, int(e))
                if key in self._entries:
                    continue
                slot = self._take_slot(for_prefetch=True, incoming=key)
                if slot is None:
                    continue  # no slot worth less than this expert
                entry = self._start_read(key, slot, PREFETCH)
                entry.prefetched = True
                self._prefetching[key] = entry
                entry.guess = self._ordinal[layer] != self._policy.layer
                self._guesses += entry.guess
                self._stats.prefetches += 1
                started += 1
        return started

    def cancel_prefetches(self, layer: int | None = None, keep=()) -> int:
        """Cancel prefetches (of `layer`, except experts in `keep`) whose reads have not
        started; their slots return to the pool."""
        cancelled, keep = 0, set(keep)
        with self._lock:
            for key, entry in list(self._prefetching.items()):
                if layer is not None and (key[0] != layer or key[1] in keep):
                    continue
                if entry.prefetched and entry.request is not None and entry.users == 0:
                    if self.engine.cancel(entry.request):
                        self._drop(key, entry)
                        self._guesses -= entry.guess
                        cancelled += 1
            self._stats.prefetches_cancelled += cancelled
        return cancelled

    @property
    def stats(self) -> CacheStats:
        """Counters so far, with the engine's bytes and busy time folded in."""
        with self._lock:
            self._stats.bytes_read = self.engine.stats.bytes_read
            self._stats.read_seconds = self.engine.stats.busy_seconds
            self._stats.pinned = sum(
                1 for k, e in self._entries.items() if k in self._pinned and e.request is None
            )
            return self._stats

    # Internals: call with the lock held.

    def _take_slot(self, for_prefetch: bool, incoming: Key | None = None) -> int | None:
        """A free slot, else the policy's evictable victim (for a prefetch of `incoming`, one
        worth less than it); for a demand read, else one whose prefetch has not started
        (cancelled). None when nothing can be had now."""
        if self._free:
            return self._free.pop()
        victim = self._victim(incoming if for_prefetch else None)
        if victim is not None:
            entry = self._entries.pop(victim)
            self._policy.evicted(self._index(victim))
            self._stats.evictions += 1
            return entry.slot
        if for_prefetch:
            return None
        for key, entry in self._prefetching.items():
            # Only a prefetch still being read can be cancelled: one that has finished is a
            # resident expert, which the policy has just declined to give up.
            if entry.request is None or not entry.prefetched or entry.users:
                continue
            if self.engine.cancel(entry.request):
                del self._entries[key], self._prefetching[key]
                self._policy.evicted(self._index(key))
                self._stats.prefetches_cancelled += 1
                self._guesses -= entry.guess
                return entry.slot
        return None

    def _victim(self, incoming: Key | None = None) -> Key | None:
        """The expert the policy gives up first among those not in use, not being read and
        not pinned; for a prefetch of `incoming`, None unless the policy admits it there."""
        entries = self._entries
        held = {self._index(k) for k in self._pinned & entries.keys()}
        for k in list(self._busy):
            e = entries.get(k)
            if e is not None and (e.users or e.request is not None or e.ahead):
                held.add(self._index(k))
            else:
                self._busy.discard(k)
        if incoming is None:
            victim = self._policy.victim(held)
        else:
            # An expert of the layer being routed now is needed in this very step: reading
            # it early is a demand read issued ahead, not a guess to weigh.
            guess = self._ordinal[incoming[0]] != self._policy.layer
            accuracy = prefetch_accuracy(self._guesses_used, self._guesses) if guess else None
            victim = self._policy.prefetch_victim(self._index(incoming), held, accuracy)
        return None if victim is None else self._key(victim)

    def _index(self, key: Key) -> int:
        """The policy's key of an expert: MoE layer ordinal * experts + expert."""
        return self._ordinal[key[0]] * self._n_experts + key[1]

    def _key(self, index: int) -> Key:
        return self._layers[index // self._n_experts], index % self._n_experts

    def _drop(self, key: Key, entry: _Entry) -> None:
        """Forget an entry whose read was cancelled or failed; its slot is free again."""
        del self._entries[key]
        if self._prefetching.get(key) is entry:
            del self._prefetching[key]
        self._policy.evicted(self._index(key))
        self._free.append(entry.slot)

    def _prefetch_in_flight(self) -> ReadRequest:
        """A running prefetch read to wait for, when a demand read finds no slot."""
        for entry in self._prefetching.values():
            if entry.prefetched and entry.users == 0 and entry.request is not None:
                return entry.request
        raise BudgetError(f"all {self.pool.n_slots} expert slots are in use; raise --ram-budget")

    def _start_read(self, key: Key, slot: int, priority: int) -> _Entry:
        extent = self.store.extent(*key)
        entry = _Entry(slot)
        self._entries[key] = entry
        self._busy.add(key)
        self._policy.admitted(self._index(key), prefetch=priority == PREFETCH)
        entry.request = self.engine.submit(
            self.pool.memory(slot)[: extent.length],
            extent.offset,
            priority,
            what=fmt.expert_name(*key),
            on_done=lambda req: self._read_done(key, entry, req),
        )
        return entry

    def _read_done(self, key: Key, entry: _Entry, req: ReadRequest) -> None:
        """In a reader thread: check the bytes and publish the weights, or drop the entry."""
        if req.error is None:
            try:
                if self.verify:
                    self.store.verify_expert(*key, req.dest)
                entry.weights = self.format.view(self.pool.tensor(entry.slot))
            except BaseException as e:
                req.error = e
        with self._lock:
            entry.request = None
            if self._prefetching.get(key) is entry:
                del self._prefetching[key]
            if req.error is not None and self._entries.get(key) is entry:
                self._drop(key, entry)
        if req.error is not None:
            raise req.error
