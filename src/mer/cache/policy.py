"""Eviction policies: which cached expert to give up when a slot is needed.

- `lru`: least recently used.
- `ours`: the expert expected to be needed last. MoE layers are visited in a
  cycle, so an expert of layer m is next wanted when m comes round again, with
  a chance p learned per expert as a decayed frequency of being chosen at its
  layer's visits; each visit it sits out costs a full cycle:
  expected distance = layers until m + L * (1 - p) / p.

Prefetch admission: a prefetch takes a slot only from an expert expected to be
needed later than the one it brings (`LayerCycleScore.admits`; under LRU, only from
one the current forward pass has not used).

The same scoring drives the trace replay simulator, so what `mer bench cache`
measures is what the cache does.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("lru", "ours")


class LayerCycleScore:
    """Per-expert reuse chances and the expected-distance score over (layer, expert) keys."""

    def __init__(self, n_layers: int, n_experts: int, decay: float = 0.95) -> None:
        self.n_layers, self.n_experts, self.decay = n_layers, n_experts, decay
        self.p = np.full(n_layers * n_experts, 1.0 / n_experts)
        self.key_layer = np.arange(n_layers * n_experts) // n_experts

    def visit(self, layer: int, chosen) -> None:
        """Layer `layer` (0-based among MoE layers) routed to experts `chosen`."""
        block = slice(layer * self.n_experts, (layer + 1) * self.n_experts)
        self.p[block] *= self.decay
        self.p[layer * self.n_experts + np.asarray(chosen, dtype=np.int64)] += 1 - self.decay

    def scores(self, layer: int) -> np.ndarray:
        """Expected distance to next use of every key, seen from `layer`: evict the largest."""
        dist = (self.key_layer - layer - 1) % self.n_layers + 1
        return dist + self.n_layers * (1 - self.p) / np.maximum(self.p, 1e-9)

    def admits(self, layer: int, incoming: int, victim_score: float, accuracy: float) -> bool:
        """Whether a prefetch of key `incoming` may evict an expert scored `victim_score`.

        The incoming expert's chance of use is at least `accuracy`, the measured share of
        prefetches that were used: a predicted expert is likelier than its frequency says,
        as likely as predictions turn out to be. It is admitted only if then expected
        sooner than the victim, so a prefetch never evicts an expert worth more."""
        q = max(float(self.p[incoming]), accuracy)
        dist = (int(self.key_layer[incoming]) - layer - 1) % self.n_layers + 1
        return victim_score > dist + self.n_layers * (1 - q) / max(q, 1e-9)


def prefetch_accuracy(used: int, issued: int) -> float:
    """Share of prefetches used, with one used and one wasted assumed before any were seen."""
    return (used + 1) / (issued + 2)
