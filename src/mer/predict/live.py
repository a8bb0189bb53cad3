"""Live prefetch from a routing-history predictor (Markov, speculator, their ensemble).

`LivePrefetcher` is a routing hook (`MoETransformer.routing_hooks`), registered after
the cache's own. At each MoE layer of a forward pass it

1. cancels the layer's prefetches the router did not choose (reads not started yet),
2. starts the demand reads of the layer's experts not in RAM (what the MoE block would
   do a moment later), so they are queued ahead of any prefetch,
3. scores the next MoE layer's experts (past the last layer: the next token's first)
   from the routing seen so far, with the same `Predictor.scores` the benchmarks
   measure, and prefetches the best ones not in RAM: as many as the device can read
   while this layer computes (`spare`), so that prefetching uses bandwidth that would
   otherwise idle, and only from the ranks whose guesses have been chosen often enough
   so far (`precision`, measured online per rank of the predictor's order): on a device
   busy a share b of the time, at least b / (1 + b) (`mer.cache.precision`): a wasted
   read costs only when a demand read has to wait for it. The read engine starts a
   prefetch only while no demand read is in flight (`mer.io.engine`), in small chunks,
   so a prefetch never queues ahead of a demand read and one under way delays it by a
   chunk at most.

The predictor learns online (`learn`, for those that can, i.e. the Markov chain): from
each sequence's routing as it runs, in blocks of `LEARN_EVERY` tokens and at its end.
A decode pass (one token) is scored with the previous token as context; the tokens of
a larger pass (a prompt, or a batch of sequences) are scored as unrelated, their
scores summed, and learned from within each token only.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mer.cache.precision import RankPrecision
from mer.errors import ConfigError
from mer.predict.base import Predictor
from mer.trace.format import Trace

LEARN_EVERY = 64  # decode tokens between two online updates of the predictor


class LivePrefetcher:
    def __init__(
        self,
        predictor: Predictor,
        cache,
        config,
        guesses: int | None = None,
        learn: bool = True,
        min_precision: float | None = None,
    ) -> None:
        """`cache`: the expert cache (`fetch`, `prefetch`, `cancel_prefetches`,
        `is_resident`, `stats`, `format`). `guesses`: experts prefetched per layer at most;
        None: as many as the measured read time fits in the measured layer time.
        `min_precision`: prefetch only from ranks guessing at least this well; None, the
        default: the bar the device's measured busy share sets (`mer.cache.precision`), so
        what is prefetched follows the device's load; 0: every rank."""
        self.predictor, self.cache, self.fixed = predictor, cache, guesses
        self.layers = tuple(config.moe_layers)
        self.column = {layer: j for j, layer in enumerate(self.layers)}
        self.top_k, self.n_experts = config.num_experts_per_tok, config.num_local_experts
        self.meta = {"n_experts": self.n_experts}
        members = getattr(predictor, "members", [predictor])  # an ensemble learns by members
        self.learners = [m for m in members if hasattr(m, "learn")] if learn else []
        self.learns = bool(self.learners)
        self._cur: np.ndarray | None = None  # [T, L, k] this pass's routing so far
        self._prev: np.ndarray | None = None  # [L, k] the last decode token of this sequence
        self._pending: list[np.ndarray] = []  # decode tokens not learned from yet
        self._last_call: float | None = None
        self.step_s: float | None = None  # measured time between two MoE layers (EMA)
        self.guessed = 0  # guesses made (prefetches asked for)
        self.ranks = RankPrecision(2 * self.top_k, min_precision)
        self._started: tuple[float, float] | None = None  # (time, device busy seconds)
        self._ranked: dict[int, list[int]] = {}  # target layer -> experts in rank order

    def begin_sequence(self) -> None:
        self._end_pass()
        self._learn()
        self._prev = None
        self._last_call = None
        self._ranked.clear()  # guesses for the last sequence's next token: never scored

    def spare(self) -> int:
        """Experts to prefetch now: what the device reads in one layer's time."""
        if self.fixed is not None:
            return self.fixed
        stats = self.cache.stats
        if not stats.bytes_read or self.step_s is None:
            return self.top_k
        read_s = stats.read_seconds / stats.bytes_read * self.cache.format.nbytes
        return int(min(self.top_k, self.step_s / max(read_s, 1e-9)))

    def __call__(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> None:
        now = time.perf_counter()
        j = self.column[layer]
        if j == 0:
            self._end_pass()
            self._cur = np.zeros((ids.shape[0], len(self.layers), self.top_k), np.int16)
        elif self._last_call is not None:
            gap = now - self._last_call
            self.step_s = gap if self.step_s is None else 0.8 * self.step_s + 0.2 * gap
        self._last_call = now
        self._cur[:, j] = ids.numpy()
        chosen = ids.unique().tolist()
        self._score_ranks(layer, chosen)
        cache = self.cache
        cache.cancel_prefetches(layer, keep=chosen)
        missing = [e for e in chosen if not cache.is_resident(layer, e)]
        if missing:
            cache.fetch(layer, missing)
        n = self.spare()
        if n <= 0 or (j + 1 == len(self.layers) and ids.shape[0] > 1):
            return  # nothing to spare, or a prompt or batch whose next tokens are unknown
        if cache.holds_every_expert():
            return  # a model that fits: guessing (a router pass ahead) would cost, not save
        target = self.layers[(j + 1) % len(self.layers)]
        scores = self._scores(j)  # [E]
        ranked = np.argsort(-scores, kind="stable")[: self.ranks.ranks].tolist()
        self._ranked[target] = ranked
        picks = self.ranks.pick(ranked, lambda e: cache.is_resident(target, e), n, self.busy())
        self.guessed += len(picks)
        cache.prefetch(target, picks)

    def busy(self) -> float:
        """The share of the time the device has been reading since the first layer seen."""
        now, busy = time.perf_counter(), self.cache.engine.stats.busy_seconds
        if self._started is None:
            self._started = (now, busy)
            return 0.0
        t0, b0 = self._started
        return (busy - b0) / (now - t0) if now > t0 else 0.0

    def precision(self) -> np.ndarray:
        """float [ranks]: the share of guesses at each rank the layer then chose."""
        return self.ranks.precision()

    @property
    def min_precision(self) -> float:
        return self.ranks.min_precision

    @min_precision.setter
    def min_precision(self, value: float) -> None:
        self.ranks.min_precision = value

    def _score_ranks(self, layer: int, chosen: list[int]) -> None:
        """The layer routed: score the guesses made for it, rank by rank (whether or not
        they were prefetched: the predictor's precision, not the cache's)."""
        ranked = self._ranked.pop(layer, None)
        if ranked is not None:
            self.ranks.score(ranked, chosen)

    def _scores(self, j: int) -> np.ndarray:
        """float32 [E]: the predictor's scores one layer-step after layer `j`, summed over
        this pass's tokens."""
        cur = self._cur
        if len(cur) == 1:  # decode: this token, after the previous one
            context = cur if self._prev is None else np.stack([self._prev, cur[0]])
            return self.predictor.next_scores(context, j, self.n_experts)
        trace = Trace(cur, np.arange(len(cur) + 1), np.zeros(len(cur), np.int8), self.meta)
        return self.predictor.scores(trace, j, 1).sum(0)

    def _end_pass(self) -> None:
        """The pass routed so far is complete: keep it as context and to learn from."""
        cur, self._cur = self._cur, None
        if cur is None:
            return
        if len(cur) == 1:
            self._prev = cur[0]
            if self.learns:
                self._pending.append(cur[0])
                if len(self._pending) >= LEARN_EVERY:
                    self._learn()
        elif self.learns:  # unrelated tokens: within-token transitions only
            n = len(cur)
            self._teach(Trace(cur, np.arange(n + 1), np.zeros(n, np.int8), self.meta))

    def _learn(self) -> None:
        if self._pending and self.learns:
            block = np.stack(self._pending)
            n = len(block)
            self._teach(Trace(block, np.array([0, n]), np.zeros(n, np.int8), self.meta))
        self._pending = []

    def _teach(self, trace: Trace) -> None:
        for m in self.learners:
            m.learn(trace)


LIVE = ("markov", "speculator", "ensemble")  # predictors of routing history, live


def live_predictor(
    name: str, config, train: Trace | None = None, speculator: str | None = None
) -> Predictor:
    """The predictor `name` of LIVE for live prefetch: the Markov chain fitted on `train`
    when given (else empty) and learning on; the speculator from its file; the ensemble
    of the two. One-line errors for what is missing or of another shape."""
    from mer.predict.ensemble import EnsemblePredictor
    from mer.predict.markov import MarkovPredictor
    from mer.predict.speculator import load_speculator

    if name not in LIVE:
        raise ConfigError(f"no live prefetch from {name!r} (choose from {', '.join(LIVE)})")
    shape = (len(config.moe_layers), config.num_local_experts)
    out: list[Predictor] = []
    if name in ("markov", "ensemble"):
        markov = MarkovPredictor(max_distance=1)
        if train is not None:
            markov.fit(train)
        else:
            k = config.num_experts_per_tok
            empty = np.zeros((0, *shape[:1], k), np.int16)
            markov.learn(Trace(empty, np.zeros(1, np.int64), np.zeros(0, np.int8),
                               {"n_experts": shape[1]}))  # fmt: skip
        out.append(markov)
    if name in ("speculator", "ensemble"):
        if speculator is None:
            raise ConfigError(f"--prefetch {name} needs --speculator FILE.pt")
        spec = load_speculator(speculator)
        if (spec.config.n_layers, spec.config.n_experts) != shape:
            raise ConfigError(
                f"{speculator}: the speculator learned {spec.config.n_layers} MoE layers x "
                f"{spec.config.n_experts} experts; the model has {shape[0]} x {shape[1]}"
            )
        out.append(spec)
    return out[0] if len(out) == 1 else EnsemblePredictor(out)
