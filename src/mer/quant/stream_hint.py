"""Which prefetch hint streams a decode step's int4 weights fastest on this machine: measured
on the model's own decode steps, then kept per machine.

A decode step reads every expert and int4 dense weight it uses once. The C kernels ask for
those lines ahead either non-temporally (NTA: kept out of the outer caches, so the Python and
PyTorch work between the kernels keeps its cache) or into every level (T0). With the whole
model in RAM, NTA decoded x1.02-1.05 faster on an AMD EPYC and T0 x1.04-1.08 faster on a
Xeon. A kernel timed alone does not show it (what NTA protects runs between the kernels),
so the first single-token decode steps of a process choose: after WARMUP steps they run in
rounds of ROUND steps, the hints taking turns (AB, BA, AB, ...), and a hint whose round was
the faster in at least WINS of PAIRS pairs is kept and saved in the kernel cache directory
under this machine, the kernel source, the thread count and the model's shape. Both hints
compute the same bits, so the trial changes no token. A step that read from the SSD is not
counted (its time is the read's). An undecided trial leaves NTA for the process and saves
nothing: a later process tries again. MER_STREAM_HINT=nta or t0 sets the hint, no trial.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mer.quant import int4_paths, native

HINTS = ("nta", "t0")
WARMUP = 4  # first steps: allocations, first calls
ROUND = 6  # steps a round, timed as their median
PAIRS = 16
WINS = 12  # of PAIRS: 3.8% by chance for two equal hints
ENV = "MER_STREAM_HINT"


def apply(hint: str) -> None:
    int4_paths.stream_non_temporal(hint == "nta")


def forced() -> str | None:
    """The hint MER_STREAM_HINT sets, or None; a value it cannot be is named."""
    value = os.environ.get(ENV)
    if not value:
        return None
    if value not in HINTS:
        raise ValueError(f"{ENV}={value!r}: choose from {', '.join(HINTS)}")
    return value


class HintTrial:
    """The hint for a model on this machine: forced, saved, or being measured. `reads`
    returns the bytes read from the SSD so far (None: a provider that never reads)."""

    def __init__(self, shape: str, reads: Callable[[], int] | None = None) -> None:
        self.reads = reads
        self.path = cache_file(shape)
        self.rounds: list[tuple[str, float]] = []  # (hint, median step seconds)
        self._times: list[float] = []
        self._steps = 0
        self.hint = forced()
        self.source = ENV
        if self.hint is None:
            self.hint, self.source = _load(self.path), "saved"
        if self.hint is None:
            self.hint, self.source = "nta", "measuring"
        apply(self.hint)

    @property
    def done(self) -> bool:
        return self.source != "measuring"

    def _next_hint(self) -> str:
        pair, second = divmod(len(self.rounds), 2)
        return HINTS[(pair + second) % 2]  # AB, BA, AB, ...

    @contextlib.contextmanager
    def step(self, timed: bool = True) -> Iterator[None]:
        """Around one forward pass of this model. A `timed` one (a single-token decode step)
        runs under the hint of the round being timed, and counts if it read nothing from
        the SSD; once chosen, every pass runs under the chosen hint (another model in the
        process, a draft's, may have set its own in between)."""
        if self.done:
            if int4_paths.streams_non_temporal() != (self.hint == "nta"):
                apply(self.hint)
            yield
            return
        self._steps += timed
        if not timed or self._steps <= WARMUP:
            yield
            return
        hint = self._next_hint()
        apply(hint)
        before = self.reads() if self.reads else 0
        t = time.perf_counter()
        yield
        seconds = time.perf_counter() - t
        if self.reads and self.reads() != before:
            return
        self._times.append(seconds)
        if len(self._times) == ROUND:
            self.rounds.append((hint, statistics.median(self._times)))
            self._times = []
            if len(self.rounds) == 2 * PAIRS:
                self._decide()

    def _decide(self) -> None:
        pairs = [dict(self.rounds[i : i + 2]) for i in range(0, len(self.rounds), 2)]
        t0_wins = sum(p["t0"] < p["nta"] for p in pairs)
        winner = "t0" if t0_wins >= WINS else "nta" if PAIRS - t0_wins >= WINS else None
        self.hint, self.source = (winner, "measured") if winner else ("nta", "undecided")
        apply(self.hint)
        if winner:
            _save(self.path, winner, pairs)

    def describe(self) -> str:
        """One line for a benchmark's header: the hint and where it came from."""
        return f"{self.hint.upper()} ({self.source})"


def cache_file(shape: str) -> Path:
    key = "\0".join(
        [
            native._cpu_identity(),
            int4_paths.SOURCE.read_text(),
            str(torch.get_num_threads()),
            shape,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return native.cache_dir() / f"stream-hint-{digest}.json"


def _load(path: Path) -> str | None:
    try:
        hint = json.loads(path.read_text())["hint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hint if hint in HINTS else None


def _save(path: Path, hint: str, pairs: list[dict[str, float]]) -> None:
    ms = [{h: round(s * 1e3, 3) for h, s in p.items()} for p in pairs]
    native.save_choice(path, {"hint": hint, "step_ms": ms})
