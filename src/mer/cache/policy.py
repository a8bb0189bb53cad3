"""Eviction policies: which cached expert to give up when a slot is needed.

Each policy is one object (`make_policy`), used by the expert cache and by both
trace replay simulators (`mer.trace.replay`, `mer.trace.prefetch`), so what
`mer bench cache` measures is what the cache does. A policy sees keys (MoE layer
ordinal * experts + expert), never slots, reads or files: its owner reports what
happens (`visit`, `begin_pass`, `admitted`, `used`, `evicted`) and asks `victim`
or `prefetch_victim`.

- `lru`: least recently used.
- `lfu`: least frequently used: the fewest uses so far, the least recent of those.
- `ours`: the expert expected to be needed last. MoE layers are visited in a
  cycle, so an expert of layer m is next wanted when m comes round again, with
  a chance p of being chosen there; each visit it sits out costs a full cycle:
  expected distance = layers until m + L * (1 - p) / p.
  p mixes two estimates, both learned online from the routing seen:
  - the expert's decayed frequency at its layer's visits (the long run);
  - its chance at the layer's next visit given the experts the layer chose at its
    last one (naive Bayes over counts of which expert followed which between
    consecutive visits of a layer): routing is sticky from token to token, and
    which experts follow which is a property of the model, learned, not assumed.
  Half each once a layer has been visited a few hundred times; before, mostly the
  frequency (follow counts of a short run are noise: in the cache, a fresh
  64-token generation read more with them at full weight). Both, not either
  alone: the next-visit chance is sharper for the next visit, the frequency better
  for the ones after, and the score looks past the next.
  On the shared DeepSeek-V2-Lite trace replayed token by token (first 5000 tokens)
  this misses 8.5% (416 slots, 25% of the experts) and 6.8% (832, 50%) fewer than
  the decayed frequency alone; replayed by prefill, under 0.1% more.

Prefetch admission: a prefetch never takes the slot of an expert the current
forward pass used or was routed to, nor of another unused prefetch. Under LRU it
takes the least recent expert's slot or none; under LFU only one used no more often
than the expert it brings; under ours only one expected to be needed later than
it (`LayerCycleScore.admits`).

Ties: LFU gives up the least recent; ours the lowest key.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection

import numpy as np

SMOOTH = 0.5  # pseudo-count of an expert's chance at a visit: unseen is unlikely, not impossible
FOLLOW_SHRINK = 4.0  # pseudo-visits pulling P(j follows i) toward P(j)
FOLLOW_WARMUP = 64.0  # visits of a layer by which follow has half its full weight in p


class LayerCycleScore:
    """Per-expert reuse chances and the expected-distance score over (layer, expert) keys.

    `top_k`: experts chosen per token. A visit that routed a batch or a whole prompt
    chose more; the evidence of its experts is then scaled by top_k / chosen, so that
    many overlapping signals do not make naive Bayes sure of everything."""

    def __init__(
        self, n_layers: int, n_experts: int, top_k: int | None = None, decay: float = 0.95
    ) -> None:
        self.n_layers, self.n_experts, self.decay = n_layers, n_experts, decay
        self.top_k = top_k
        n = n_layers * n_experts
        self.freq = np.full(n, 1.0 / n_experts)  # decayed frequency at the layer's visits
        self.follow = np.full(n, 1.0 / n_experts)  # chance at the next visit, given the last
        self.p = np.full(n, 1.0 / n_experts)  # the reuse chance scored: the two mixed
        self.key_layer = np.arange(n) // n_experts
        # Between consecutive visits of a layer: how often expert i chosen at the first was
        # followed by expert j at the second, how often i was chosen at a first and j at a
        # second, and how many such pairs of visits.
        self.pairs = np.zeros((n_layers, n_experts, n_experts))
        self.first = np.zeros((n_layers, n_experts))
        self.second = np.zeros((n_layers, n_experts))
        self.visits = np.zeros(n_layers)
        self.last: list[np.ndarray | None] = [None] * n_layers

    def visit(self, layer: int, chosen) -> None:
        """Layer `layer` (0-based among MoE layers) routed to experts `chosen`."""
        chosen = np.unique(np.asarray(chosen, dtype=np.int64))
        last = self.last[layer]
        if last is not None:
            self.pairs[layer, last[:, None], chosen] += 1
            self.first[layer][last] += 1
            self.second[layer][chosen] += 1
            self.visits[layer] += 1
        self.last[layer] = chosen
        block = slice(layer * self.n_experts, (layer + 1) * self.n_experts)
        self.freq[block] *= self.decay
        self.freq[layer * self.n_experts + chosen] += 1 - self.decay
        self.follow[block] = self._follow(layer, chosen)
        # Half each once the layer's follow counts are many; less of follow while they are few.
        trust = self.visits[layer] / (self.visits[layer] + FOLLOW_WARMUP) / 2
        self.p[block] = (1 - trust) * self.freq[block] + trust * self.follow[block]

    def _follow(self, layer: int, chosen: np.ndarray) -> np.ndarray:
        """Naive Bayes: each expert j's chance at the layer's next visit given `chosen` now.

        Log-odds = prior log-odds of j + for each chosen i, logit P(j | i) - logit P(j)
        (Bayes' rule turns this into NB's likelihood ratio). P(j | i) is shrunk toward
        P(j) by FOLLOW_SHRINK pseudo-visits, so an expert seldom seen before says little."""
        visits, second = self.visits[layer], self.second[layer]
        prior = (second + SMOOTH) / (visits + 2 * SMOOTH)  # [E]
        logit = np.log(prior / (1 - prior))
        if len(chosen):
            pairs = self.pairs[layer][chosen]  # [chosen, E]
            first = self.first[layer][chosen][:, None]
            given = (pairs + FOLLOW_SHRINK * prior) / (first + FOLLOW_SHRINK)
            scale = 1.0 if self.top_k is None else min(1.0, self.top_k / len(chosen))
            logit += scale * (np.log(given / (1 - given)) - logit).sum(0)
        return 1 / (1 + np.exp(-logit))

    def scores(self, layer: int) -> np.ndarray:
        """Expected distance to next use of every key, seen from `layer`: evict the largest."""
        dist = (self.key_layer - layer - 1) % self.n_layers + 1
        return dist + self.n_layers * (1 - self.p) / np.maximum(self.p, 1e-9)

    def admits(self, layer: int, incoming: int, victim_score: float, accuracy: float) -> bool:
        """Whether a prefetch of key `incoming` may evict an expert scored `victim_score`.

        The incoming expert's chance of use is at least `accuracy`, the measured share of
        prefetches that were used: a predicted expert is likelier than its reuse chance says,
        as likely as predictions turn out to be. It is admitted only if then expected
        sooner than the victim, so a prefetch never evicts an expert worth more."""
        q = max(float(self.p[incoming]), accuracy)
        dist = (int(self.key_layer[incoming]) - layer - 1) % self.n_layers + 1
        return victim_score > dist + self.n_layers * (1 - q) / max(q, 1e-9)


def prefetch_accuracy(used: int, issued: int) -> float:
    """Share of prefetches used, with one used and one wasted assumed before any were seen."""
    return (used + 1) / (issued + 2)


class Policy(ABC):
    """An eviction policy over the resident keys of a cache (int keys: layer ordinal *
    n_experts + expert). The owner reports every change; the policy only chooses.

    `held`: keys that must stay whatever the policy thinks (in use, being read, pinned),
    a small collection, tested with `in` (and iterated by `ours`)."""

    name: str

    def __init__(self, n_layers: int, n_experts: int, top_k: int | None = None) -> None:
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        self.layer = 0  # the MoE layer (ordinal) routed last
        self.passes = 0  # forward passes begun: the current one's number

    @abstractmethod
    def visit(self, layer: int, chosen) -> None:
        """MoE layer `layer` (ordinal) routed to experts `chosen`: they are about to be used
        in this pass (no prefetch may take their slots)."""

    def begin_pass(self) -> None:
        """A new forward pass (a token, or a prompt): nothing used in it yet."""
        self.passes += 1

    @abstractmethod
    def __contains__(self, key: int) -> bool: ...

    @abstractmethod
    def admitted(self, key: int, prefetch: bool = False) -> None:
        """`key` took a slot (a prefetch: not used yet)."""

    @abstractmethod
    def used(self, key: int) -> None:
        """`key`, resident, was used."""

    @abstractmethod
    def evicted(self, key: int) -> None:
        """`key` left its slot (evicted, cancelled, or its read failed)."""

    @abstractmethod
    def victim(self, held: Collection[int]) -> int | None:
        """The resident key to give up for a demand read, not one in `held`; None if none."""

    @abstractmethod
    def prefetch_victim(
        self, incoming: int, held: Collection[int], accuracy: float | None
    ) -> int | None:
        """The resident key whose slot a prefetch of `incoming` may take, or None.
        `accuracy`: the share of guesses used (`prefetch_accuracy`), or None when
        `incoming` is needed in this very step (no guess to weigh)."""


class _Recency(Policy):
    """Bookkeeping of the dict-based policies: which keys the pass used, unused prefetches."""

    def __init__(self, n_layers: int, n_experts: int, top_k: int | None = None) -> None:
        super().__init__(n_layers, n_experts, top_k)
        self._last_pass: dict[int, int] = {}
        self._unused: set[int] = set()

    def visit(self, layer: int, chosen) -> None:
        self.layer = layer
        for e in chosen:
            self._last_pass[layer * self.n_experts + int(e)] = self.passes

    def _protected(self, key: int) -> bool:
        """Not a prefetch's to take: used (or routed to) in this pass, or an unused prefetch."""
        return key in self._unused or self._last_pass.get(key) == self.passes

    def admitted(self, key: int, prefetch: bool = False) -> None:
        if prefetch:
            self._unused.add(key)

    def used(self, key: int) -> None:
        self._last_pass[key] = self.passes
        if self._unused:
            self._unused.discard(key)

    def evicted(self, key: int) -> None:
        self._unused.discard(key)


class LRU(_Recency):
    name = "lru"

    def __init__(self, n_layers: int, n_experts: int, top_k: int | None = None) -> None:
        super().__init__(n_layers, n_experts, top_k)
        self._order: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def __contains__(self, key: int) -> bool:
        return key in self._order

    def admitted(self, key: int, prefetch: bool = False) -> None:
        super().admitted(key, prefetch)
        self._order[key] = None

    def used(self, key: int) -> None:
        self._order.move_to_end(key)
        self._last_pass[key] = self.passes
        if self._unused:
            self._unused.discard(key)

    def evicted(self, key: int) -> None:
        super().evicted(key)
        del self._order[key]

    def victim(self, held: Collection[int]) -> int | None:
        return next((k for k in self._order if k not in held), None)

    def prefetch_victim(
        self, incoming: int, held: Collection[int], accuracy: float | None
    ) -> int | None:
        # Only the least recent may go: if the pass used it, everything else is more recent.
        victim = self.victim(held)
        return None if victim is None or self._protected(victim) else victim


class LFU(_Recency):
    name = "lfu"

    def __init__(self, n_layers: int, n_experts: int, top_k: int | None = None) -> None:
        super().__init__(n_layers, n_experts, top_k)
        self._count: dict[int, int] = {}  # uses so far, resident or not
        self._last: dict[int, int] = {}  # tick of the last admission or use
        self._resident: set[int] = set()
        self._heap: list[tuple[int, int, int]] = []  # (count, tick, key); stale ones skipped
        self._tick = 0

    def __contains__(self, key: int) -> bool:
        return key in self._resident

    def _push(self, key: int) -> None:
        self._tick += 1
        self._last[key] = self._tick
        heapq.heappush(self._heap, (self._count.get(key, 0), self._tick, key))

    def admitted(self, key: int, prefetch: bool = False) -> None:
        super().admitted(key, prefetch)
        self._resident.add(key)
        self._push(key)

    def used(self, key: int) -> None:
        self._last_pass[key] = self.passes
        if self._unused:
            self._unused.discard(key)
        self._count[key] = self._count.get(key, 0) + 1
        self._push(key)
        if len(self._heap) > 8 * len(self._resident) + 1024:  # drop stale entries now and then
            self._heap = [(self._count.get(k, 0), self._last[k], k) for k in self._resident]
            heapq.heapify(self._heap)

    def evicted(self, key: int) -> None:
        super().evicted(key)
        self._resident.discard(key)

    def _least(self, skip: Callable[[int], bool]) -> int | None:
        """The least used resident key (ties: least recent) that `skip` does not refuse."""
        passed, found = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            c, t, k = entry
            if k not in self._resident or self._count.get(k, 0) != c or self._last[k] != t:
                continue  # stale
            passed.append(entry)
            if not skip(k):
                found = k
                break
        for entry in passed:
            heapq.heappush(self._heap, entry)
        return found

    def victim(self, held: Collection[int]) -> int | None:
        return self._least(held.__contains__)

    def prefetch_victim(
        self, incoming: int, held: Collection[int], accuracy: float | None
    ) -> int | None:
        victim = self._least(lambda k: k in held or self._protected(k))
        if victim is None or self._count.get(victim, 0) > self._count.get(incoming, 0):
            return None
        return victim


class Ours(Policy):
    """Expected distance to next use (`LayerCycleScore`), over numpy arrays of all keys."""

    name = "ours"

    def __init__(self, n_layers: int, n_experts: int, top_k: int | None = None) -> None:
        super().__init__(n_layers, n_experts, top_k)
        self.score = LayerCycleScore(n_layers, n_experts, top_k)
        n = n_layers * n_experts
        self.resident = np.zeros(n, dtype=bool)
        self.unused = np.zeros(n, dtype=bool)  # prefetched, not used yet
        self.last_pass = np.full(n, -1, dtype=np.int64)
        self._scores: np.ndarray | None = None  # of the layer routed last, until the next visit

    def __contains__(self, key: int) -> bool:
        return bool(self.resident[key])

    def visit(self, layer: int, chosen) -> None:
        chosen = np.asarray(chosen, dtype=np.int64)
        self.layer = layer
        self.score.visit(layer, chosen)
        self._scores = None
        self.last_pass[layer * self.n_experts + chosen] = self.passes

    def scores(self) -> np.ndarray:
        if self._scores is None:
            self._scores = self.score.scores(self.layer)
        return self._scores

    def admitted(self, key: int, prefetch: bool = False) -> None:
        self.resident[key] = True
        self.unused[key] = prefetch

    def used(self, key: int) -> None:
        self.unused[key] = False
        self.last_pass[key] = self.passes

    def evicted(self, key: int) -> None:
        self.resident[key] = self.unused[key] = False

    def _best(self, evictable: np.ndarray, held: Collection[int]) -> tuple[int, float] | None:
        """(key, score) of the evictable key not held that scores highest; None if none."""
        candidates = np.where(evictable, self.scores(), -np.inf)
        if held:
            candidates[np.fromiter(held, np.int64, len(held))] = -np.inf
        victim = int(np.argmax(candidates))
        worth = float(candidates[victim])
        return None if worth == -np.inf else (victim, worth)

    def victim(self, held: Collection[int]) -> int | None:
        best = self._best(self.resident, held)
        return None if best is None else best[0]

    def prefetch_victim(
        self, incoming: int, held: Collection[int], accuracy: float | None
    ) -> int | None:
        evictable = self.resident & ~self.unused & (self.last_pass < self.passes)
        best = self._best(evictable, held)
        if best is None:
            return None
        victim, worth = best
        if accuracy is not None and not self.score.admits(self.layer, incoming, worth, accuracy):
            return None
        return victim


_POLICY_TYPES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, Ours)}
POLICIES = tuple(_POLICY_TYPES)


def make_policy(name: str, n_layers: int, n_experts: int, top_k: int | None = None) -> Policy:
    """The policy called `name` (one of POLICIES) over n_layers x n_experts keys."""
    if name not in _POLICY_TYPES:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    return _POLICY_TYPES[name](n_layers, n_experts, top_k)
