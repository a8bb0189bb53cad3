"""Eviction policies: which cached expert to give up when a slot is needed.

- `lru`: least recently used.
- `lfu`: least frequently used: the fewest acquires so far, the least recent of those
  (kept in `mer.cache.expert_cache`; it scores nothing here).
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

Prefetch admission: a prefetch takes a slot only from an expert expected to be
needed later than the one it brings (`LayerCycleScore.admits`; under LRU, only from
one the current forward pass has not used).

The same scoring drives the trace replay simulator, so what `mer bench cache`
measures is what the cache does.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("lru", "lfu", "ours")
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
