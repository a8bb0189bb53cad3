"""The expert cache: (layer, expert) -> a slot holding its bytes, filled from the store on a miss.

Invariants: an expert in use (acquired and not yet released) is never
evicted; a slot holds the bytes of at most one expert, and only after they
were read whole and passed their checksum; a failed read leaves the cache as
it was. Eviction is least-recently-used for now (the controller with
frequency and prediction is a later part). Counters record what happened,
never estimates.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

from mer.cache.pool import SlotPool
from mer.errors import BudgetError
from mer.io.direct import DirectReader
from mer.quant.expert import ExpertWeights
from mer.store.reader import Store

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def read_bandwidth(self) -> float:
        return self.bytes_read / self.read_seconds if self.read_seconds else 0.0


@dataclass
class _Entry:
    slot: int
    weights: ExpertWeights
    users: int = 0


class ExpertCache:
    def __init__(
        self,
        store: Store,
        budget_bytes: int,
        reader: DirectReader | None = None,
        verify: bool = True,
    ) -> None:
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
        self.reader = reader or DirectReader(store.expert_path)
        self.verify = verify
        self.stats = CacheStats()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # oldest use first
        self._free = list(range(self.pool.n_slots - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def n_slots(self) -> int:
        return self.pool.n_slots

    def is_resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._entries

    def acquire(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's weights, read from the store on a miss; pinned until `release`."""
        key = (layer, expert)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.stats.hits += 1
                entry.users += 1
                self._entries.move_to_end(key)
                return entry.weights
            slot = self._take_slot()
        try:
            weights = self._load(key, slot)
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        with self._lock:
            self.stats.misses += 1
            self._entries[key] = _Entry(slot, weights, users=1)
        return weights

    def release(self, layer: int, expert: int) -> None:
        with self._lock:
            entry = self._entries[(layer, expert)]
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

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for key, entry in self._entries.items():  # least recently used first
            if entry.users == 0:
                del self._entries[key]
                self.stats.evictions += 1
                return entry.slot
        raise BudgetError(f"all {self.pool.n_slots} expert slots are in use; raise --ram-budget")

    def _load(self, key: Key, slot: int) -> ExpertWeights:
        extent = self.store.extent(*key)
        mem = self.pool.memory(slot)[: extent.length]
        t0 = time.perf_counter()
        self.reader.read_into(mem, extent.offset)
        elapsed = time.perf_counter() - t0
        if self.verify:
            self.store.verify_expert(*key, mem)
        with self._lock:
            self.stats.bytes_read += extent.length
            self.stats.read_seconds += elapsed
        return self.format.view(self.pool.tensor(slot))
