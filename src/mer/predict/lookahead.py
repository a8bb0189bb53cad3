"""Router lookahead: the routers of the layers ahead applied to this layer's hidden state.

A transformer's residual stream changes little from one layer to the next, so the
router of layer l + d applied to the hidden state entering MoE layer l guesses what
it will pick at l + d. `LookaheadPrefetcher` does this live for d = 1, as a routing
hook of the model. `LookaheadPredictor` measures it on traces recorded with hidden
states (`mer generate --trace-hidden`) and the store's router weights; past the
token's last layer there is no hidden state of the next token yet: there it falls
back to the frequency baseline.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from mer.errors import ConfigError
from mer.predict.base import Predictor
from mer.predict.frequency import FrequencyPredictor
from mer.trace.format import Trace


class LookaheadPrefetcher:
    """Live prefetch, a routing hook (`MoETransformer.routing_hooks`): at each MoE layer,
    cancel its prefetches the router did not choose (reads not started yet), then apply
    the next MoE layer's router to this layer's hidden state and prefetch the experts it
    picks, so their reads overlap this layer's expert compute. Register it after the
    cache's own routing hook, so the cache knows this layer's routing when asked for slots.
    Once the cache holds every expert (a model that fits) it guesses no more: a router
    pass per layer that could prefetch nothing.
    """

    def __init__(self, transformer, cache) -> None:
        """`transformer`: a MoETransformer (its routers); `cache`: anything with
        `prefetch(layer, experts)` and `cancel_prefetches(layer, keep)` (the expert cache)."""
        self.transformer, self.cache = transformer, cache
        self.holds_all = getattr(cache, "holds_every_expert", lambda: False)
        self.next_layer = dict(pairwise(transformer.config.moe_layers))

    def __call__(
        self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> None:
        self.cache.cancel_prefetches(layer, keep=experts.unique().tolist())
        nxt = self.next_layer.get(layer)
        if nxt is not None and not self.holds_all():  # a model that fits: no guess
            # the family's own routing (router biases, top-k softmax, ...), on this hidden state
            _, guess = self.transformer.family.route(self.transformer, nxt, hidden, None)
            self.cache.prefetch(nxt, guess.unique().tolist())


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
