"""Top-k recall and precision of a predictor on a trace, per layer distance.

At each position the predictor's `guesses` highest-scored experts are compared with
the experts really chosen there: recall = hits / top_k, precision = hits / guesses.
With as many guesses as the router picks (top_k) the two are the same number, so
both are also given for 2 * top_k guesses, the trade a prefetcher makes (more of
the needed experts, more wasted reads). Distances are counted within a token
(d = 1, 2, 3: from every layer that has a layer d further on), and separately
from a token's last layer to the next token's first ("next token"), where
predicting means guessing the routing of a token not yet sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer.predict.base import Predictor, shifted
from mer.trace.format import Trace

NEXT_TOKEN = "next token"


@dataclass(frozen=True)
class Score:
    positions: int  # predictions judged
    hits_k: int  # of top_k guesses, how many were chosen
    hits_2k: int  # of 2 * top_k guesses
    top_k: int

    @property
    def recall(self) -> float:  # = precision with top_k guesses
        return self.hits_k / max(1, self.positions * self.top_k)

    @property
    def recall_2k(self) -> float:
        return self.hits_2k / max(1, self.positions * self.top_k)

    @property
    def precision_2k(self) -> float:
        return self.hits_2k / max(1, self.positions * 2 * self.top_k)


def chance(n_experts: int, top_k: int) -> Score:
    """What guessing uniformly at random scores, in expectation (as if over 10^6 positions)."""
    n = 10**6
    return Score(n, round(n * top_k * top_k / n_experts),
                 round(n * top_k * min(2 * top_k, n_experts) / n_experts), top_k)  # fmt: skip


def distances(n_layers: int, max_distance: int = 3) -> list[int | str]:
    return [d for d in range(1, max_distance + 1) if d < n_layers] + [NEXT_TOKEN]


def evaluate(predictor: Predictor, trace: Trace, distance: int | str) -> Score:
    """The predictor's score at one distance (an int within a token, or NEXT_TOKEN)."""
    k = trace.top_k
    pairs = (
        [(trace.n_layers - 1, 1)]
        if distance == NEXT_TOKEN
        else [(layer, distance) for layer in range(trace.n_layers - distance)]
    )
    positions = hits_k = hits_2k = 0
    for layer, d in pairs:
        ok, actual = shifted(trace, layer, d)
        if not ok.any():
            continue
        scores = predictor.scores(trace, layer, d)[ok]
        actual = actual[ok]
        n = min(2 * k, scores.shape[1])
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        # Order the 2k guesses best first, so the first k are the top-k guesses.
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)
        hit = (top[:, :, None] == actual[:, None, :]).any(-1)  # [n, 2k]
        positions += len(actual)
        hits_k += int(hit[:, :k].sum())
        hits_2k += int(hit.sum())
    return Score(positions, hits_k, hits_2k, k)
