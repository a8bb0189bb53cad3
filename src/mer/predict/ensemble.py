"""Ensemble: a weighted average of its members' scores, each row first scaled to sum 1.

Members score on different scales (naive-Bayes posteriors, sigmoids, a softmax);
normalising each row makes them votes of equal size before the weights apply.
"""

from __future__ import annotations

import numpy as np

from mer.predict.base import Predictor
from mer.trace.format import Trace


class EnsemblePredictor(Predictor):
    def __init__(self, members: list[Predictor], weights: list[float] | None = None) -> None:
        if not members:
            raise ValueError("an ensemble needs members")
        weights = weights or [1.0] * len(members)
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"bad ensemble weights {weights} for {len(members)} members")
        self.members = members
        self.weights = [w / sum(weights) for w in weights]
        self.name = "ensemble"
        self.description = " + ".join(
            f"{w:.2f} {m.name}" for m, w in zip(members, self.weights, strict=True)
        )

    def fit(self, train: Trace) -> EnsemblePredictor:
        for m in self.members:
            m.fit(train)
        return self

    def scores(self, trace: Trace, layer: int, distance: int) -> np.ndarray:
        total = np.zeros((trace.n_tokens, trace.n_experts), np.float32)
        for m, w in zip(self.members, self.weights, strict=True):
            s = m.scores(trace, layer, distance)
            total += w * s / np.maximum(s.sum(1, keepdims=True), 1e-12)
        return total * trace.top_k

    def next_scores(self, experts: np.ndarray, layer: int, n_experts: int) -> np.ndarray:
        total = np.zeros(n_experts, np.float32)
        for m, w in zip(self.members, self.weights, strict=True):
            s = m.next_scores(experts, layer, n_experts)
            total += w * s / max(float(s.sum()), 1e-12)
        return total * experts.shape[-1]
