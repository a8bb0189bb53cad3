"""Router lookahead: the routers of the layers ahead applied to this layer's hidden state.

A transformer's residual stream changes little from one layer to the next, so the
router of layer l + d applied to the hidden state entering MoE layer l guesses what
it will pick at l + d (the model's own prefetch does this for d = 1). Needs traces
recorded with hidden states (`mer generate --trace-hidden`) and the store's router
weights. Past the token's last layer there is no hidden state of the next token
yet: there it falls back to the frequency baseline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mer.errors import ConfigError
from mer.predict.base import Predictor
from mer.predict.frequency import FrequencyPredictor
from mer.trace.format import Trace


class LookaheadPredictor(Predictor):
    name = "lookahead"

    def __init__(self, routers: np.ndarray, where: str = "routers") -> None:
        self.routers = routers.astype(np.float32)  # [MoE layers, experts, hidden]
        self.where = where
        self.fallback = FrequencyPredictor()

    @classmethod
    def from_store(cls, path: str | Path) -> LookaheadPredictor:
        from mer.store.reader import Store

        store = Store(path)
        names = [f"layers.{m}.router" for m in store.config.moe_layers]
        dense = store.load_dense(names=names)
        return cls(np.stack([dense[n].float().numpy() for n in names]), str(store.path))

    def fit(self, train: Trace) -> LookaheadPredictor:
        self.fallback.fit(train)
        return self

    def check(self, trace: Trace, name: str = "the trace") -> None:
        n_layers, n_experts, hidden = self.routers.shape
        if trace.hidden is None:
            raise ConfigError(f"{name} has no hidden states for router lookahead "
                              "(record it with mer generate --trace-hidden)")  # fmt: skip
        if (trace.n_layers, trace.n_experts, trace.hidden.shape[2]) != (
            n_layers,
            n_experts,
            hidden,
        ):
            raise ConfigError(
                f"{name} ({trace.n_layers} MoE layers x {trace.n_experts} experts, hidden "
                f"{trace.hidden.shape[2]}) was not recorded from {self.where} ({n_layers} x "
                f"{n_experts}, hidden {hidden})"
            )

    def scores(self, trace: Trace, layer: int, distance: int) -> np.ndarray:
        self.check(trace)
        target = layer + distance
        if target >= trace.n_layers:  # the next token's hidden state does not exist yet
            return self.fallback.scores(trace, layer, distance)
        logits = trace.hidden[:, layer].astype(np.float32) @ self.routers[target].T  # [T, E]
        return softmax(logits)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)
