"""The predictor interface, and where in a trace each prediction looks.

A predictor scores the experts of the MoE layer `distance` layer-steps after a
given one, from the routing seen so far: at token t and layer l, the target is
layer l + d of token t, or, past the last layer, the first layers of token t + 1.
It sees token t's routing up to layer l and everything before (and, for router
lookahead, the hidden state at l), never the target. Scores are estimated
chances of being chosen: each in [0, 1], a row summing to about top_k, so they
can be compared, averaged (`ensemble`) and used as prefetch guesses.

Predictors work on a whole trace at once, one (layer, distance) at a time, so
measuring them on tens of thousands of tokens is a few matrix products.
"""

from __future__ import annotations

import numpy as np

from mer.errors import ConfigError
from mer.trace.format import Trace


class Predictor:
    name = "predictor"

    def fit(self, train: Trace) -> Predictor:
        """Learn from a training trace (sequences other than those it will score)."""
        return self

    def scores(self, trace: Trace, layer: int, distance: int) -> np.ndarray:
        """float32 [tokens, n_experts]: row t scores the experts `distance` layer-steps after
        (token t, MoE layer `layer`). Rows whose target lies past t's sequence are
        computed like the others and mean nothing."""
        raise NotImplementedError

    def next_scores(self, experts: np.ndarray, layer: int, n_experts: int) -> np.ndarray:
        """float32 [n_experts]: the scores one layer-step after MoE layer `layer` of the last
        token of `experts` (int [T, L, k], one sequence's tokens, the last routed up to
        `layer`): row T - 1 of `scores` at distance 1. The live prefetcher asks this at every
        layer of every decode token; a predictor that can score one position without a
        whole trace's machinery overrides it."""
        n = len(experts)
        trace = Trace(experts, np.array([0, n]), np.zeros(n, np.int8), {"n_experts": n_experts})
        return self.scores(trace, layer, 1)[-1]


def shifted(trace: Trace, layer: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The routing `offset` layer-steps from (token t, `layer`) for every t (negative:
    earlier): (valid bool [T], experts int64 [T, k]); invalid where that position falls
    outside t's sequence (its experts are then those of a clipped position)."""
    n_tokens = trace.n_tokens
    token_step, target = divmod(layer + offset, trace.n_layers)
    t = np.arange(n_tokens) + token_step
    inside = (t >= 0) & (t < n_tokens)
    t = np.clip(t, 0, max(n_tokens - 1, 0))
    seq = sequence_ids(trace)
    valid = inside & (seq[t] == seq)
    return valid, trace.experts[t, target].astype(np.int64)


def sequence_ids(trace: Trace) -> np.ndarray:
    """int64 [T]: which sequence each token belongs to."""
    return np.repeat(np.arange(trace.n_sequences), np.diff(trace.seq_starts))


def multi_hot(experts: np.ndarray, n_experts: int, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [T, n_experts] with a 1 at each chosen expert ([T, k] ids); zero rows where
    `rows` (bool [T]) is False."""
    out = np.zeros((len(experts), n_experts), np.float32)
    np.put_along_axis(out, experts, 1.0, axis=1)
    if rows is not None:
        out[~rows] = 0
    return out


def target_layer(trace: Trace, layer: int, distance: int) -> int:
    return (layer + distance) % trace.n_layers


def check_distance(distance: int, max_distance: int, who: str) -> None:
    if not 1 <= distance <= max_distance:
        raise ConfigError(f"{who} predicts 1..{max_distance} layers ahead, not {distance}")


def check_shape(trace: Trace, n_layers: int, n_experts: int, who: str) -> None:
    """The trace must have the layers and experts the predictor learned."""
    if (trace.n_layers, trace.n_experts) != (n_layers, n_experts):
        raise ConfigError(
            f"{who} learned {n_layers} MoE layers x {n_experts} experts; this trace has "
            f"{trace.n_layers} x {trace.n_experts}"
        )
