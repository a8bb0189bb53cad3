"""Frequency baseline: each expert's share of its layer's choices in the training trace,
whatever the routing so far. A predictor that cannot beat it has learned nothing."""

from __future__ import annotations

import numpy as np

from mer.predict.base import Predictor, check_shape, target_layer
from mer.trace.format import Trace


class FrequencyPredictor(Predictor):
    name = "frequency"

    def __init__(self) -> None:
        self.chance: np.ndarray | None = None  # float32 [layers, experts], rows sum to top_k

    def fit(self, train: Trace) -> FrequencyPredictor:
        counts = np.zeros((train.n_layers, train.n_experts), np.float64)
        for m in range(train.n_layers):
            counts[m] = np.bincount(train.experts[:, m].reshape(-1), minlength=train.n_experts)
        # One pseudo-choice per expert so an expert unseen in training keeps a small chance.
        self.chance = ((counts + 1) / (train.n_tokens + train.n_experts / train.top_k)).astype(
            np.float32
        )
        return self

    def scores(self, trace: Trace, layer: int, distance: int) -> np.ndarray:
        if self.chance is None:  # nothing learned: every expert equally likely
            row = np.full(trace.n_experts, trace.top_k / trace.n_experts, np.float32)
        else:
            check_shape(trace, *self.chance.shape, "the frequency baseline")
            row = self.chance[target_layer(trace, layer, distance)]
        return np.broadcast_to(row, (trace.n_tokens, trace.n_experts)).copy()
