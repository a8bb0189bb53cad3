"""How well each rank of a predictor's guesses has done, online: which guesses pay.

A live prefetcher guesses a layer's experts in the predictor's order (best first). A
guess at rank r pays when the layer then chooses it: it saves a demand read. One that
does not costs device time, but only when a demand read comes while it is being read,
i.e. about as often as the device is busy (prefetches use only time demand reads leave,
`mer.io.engine`). So a guess of precision p pays when p > (1 - p) * busy, that is when
p >= busy / (1 + busy): any guess on an idle device, and on a device always busy only
guesses that are right at least half the time, so wasted reads never outnumber used
ones. `RankPrecision` keeps, per rank, the decayed share of guesses the layer then
chose (from a prior of one half), and picks guesses only from the ranks at or above
that bar (or a fixed `min_precision`). The engine's prefetcher (`mer.predict.live`)
and the timed replay (`mer.trace.replay`) use the same object, so the simulator
prefetches what the engine would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

PRIOR = (1.0, 2.0)  # (chosen, guessed) pseudo-counts per rank: a precision of 0.5 at first
DECAY = 0.995  # per scored layer, so precision follows the routing of late


class RankPrecision:
    def __init__(self, ranks: int, min_precision: float | None = None) -> None:
        """`min_precision`: a fixed bar; None: busy / (1 + busy) (`bar`)."""
        self.min_precision = min_precision
        self.chosen, self.tried = np.full(ranks, PRIOR[0]), np.full(ranks, PRIOR[1])

    @property
    def ranks(self) -> int:
        return len(self.tried)

    def precision(self) -> np.ndarray:
        """float [ranks]: the decayed share of each rank's guesses that were chosen."""
        return self.chosen / self.tried

    def score(self, ranked: Sequence[int], chosen) -> None:
        """The layer guessed as `ranked` (best first) chose `chosen`."""
        chosen = set(chosen)  # a few ids: np.isin costs ~0.1 ms on arrays this small
        hit = np.array([key in chosen for key in ranked[: self.ranks]], dtype=bool)
        self.chosen *= DECAY
        self.tried *= DECAY
        self.chosen[: len(hit)] += hit
        self.tried[: len(hit)] += 1

    def bar(self, busy: float) -> float:
        """The precision a guess needs on a device busy this share of the time."""
        if self.min_precision is not None:
            return self.min_precision
        busy = min(max(busy, 0.0), 1.0)
        return busy / (1 + busy)

    def pick(
        self, ranked: Sequence[int], resident: Callable[[int], bool], n: int, busy: float = 1.0
    ) -> list[int]:
        """Up to `n` guesses not `resident`, best rank first, from the ranks that pay on a
        device `busy` that share of the time (the first that does not ends the search:
        ranks further down guess worse)."""
        good = self.precision() >= self.bar(busy)
        out: list[int] = []
        for rank, key in enumerate(ranked[: self.ranks]):
            if not good[rank] or len(out) >= n:
                break
            if not resident(key):
                out.append(key)
        return out
