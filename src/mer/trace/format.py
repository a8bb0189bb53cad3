"""Routing traces: which experts each token chose at each MoE layer, in one `.npz` file.

The layout is the one of `shared/traces/README.md`, so our recorded traces and
published ones load with the same code: `experts` int16 [tokens, layers, top_k],
`seq_starts` int64 [sequences + 1], `phase` int8 [tokens] (0 prefill, 1 decode),
`meta` a JSON string (model, n_experts, top_k, moe_layers, ...). Our traces may
add `weights` float16 [tokens, layers, top_k] (router weights of the choices) and,
recorded with `mer generate --trace-hidden`, `hidden` float16 [tokens, layers, hidden]:
the hidden state entering each MoE block, after its norm, i.e. exactly what the
block's router multiplies (router lookahead, `mer.predict.lookahead`, needs it).
`layers` counts MoE layers only, in model order (`meta["moe_layers"]` names them).
Our traces also record `meta["expert_bytes"]`, the size of one expert read in the
traced store, so that replays price misses in that model's bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from mer.errors import MerError


@dataclass
class Trace:
    experts: np.ndarray  # int16 [tokens, layers, top_k]
    seq_starts: np.ndarray  # int64 [sequences + 1]
    phase: np.ndarray  # int8 [tokens]
    meta: dict = field(default_factory=dict)
    weights: np.ndarray | None = None  # float16 [tokens, layers, top_k]
    hidden: np.ndarray | None = None  # float16 [tokens, layers, hidden]

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def n_experts(self) -> int:
        return int(self.meta.get("n_experts") or self.experts.max() + 1)

    def sequences(self):
        """(start, end) token ranges of each sequence."""
        return zip(self.seq_starts[:-1].tolist(), self.seq_starts[1:].tolist(), strict=True)

    @property
    def n_sequences(self) -> int:
        return len(self.seq_starts) - 1

    def head(self, max_tokens: int) -> Trace:
        """The whole sequences that fit in the first `max_tokens` tokens (at least one)."""
        cut = int(np.searchsorted(self.seq_starts, max_tokens, side="right")) - 1
        return self.select(range(max(cut, 1)))

    def select(self, sequences) -> Trace:
        """A trace of the given sequences (indices, in that order)."""
        ranges = [(int(self.seq_starts[i]), int(self.seq_starts[i + 1])) for i in sequences]
        rows = np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, np.int64)])
        starts = np.concatenate([[0], np.cumsum([b - a for a, b in ranges])]).astype(np.int64)
        w, h = (None if a is None else a[rows] for a in (self.weights, self.hidden))
        return Trace(self.experts[rows], starts, self.phase[rows], self.meta, w, h)

    def fingerprint(self) -> str:
        """A short hash of the routing: tells whether two traces are the same recording."""
        h = xxhash.xxh64(np.ascontiguousarray(self.experts).tobytes())
        h.update(np.ascontiguousarray(self.seq_starts, dtype=np.int64).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        arrays = dict(
            experts=self.experts.astype(np.int16),
            seq_starts=self.seq_starts.astype(np.int64),
            phase=self.phase.astype(np.int8),
            meta=np.array(json.dumps(self.meta)),
        )
        if self.weights is not None:
            arrays["weights"] = self.weights.astype(np.float16)
        if self.hidden is not None:
            arrays["hidden"] = self.hidden.astype(np.float16)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    try:
        data = np.load(path)
        experts, starts = data["experts"], data["seq_starts"]
        phase = data["phase"] if "phase" in data.files else np.zeros(len(experts), np.int8)
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        weights = data["weights"] if "weights" in data.files else None
        hidden = data["hidden"] if "hidden" in data.files else None
    except FileNotFoundError:
        raise MerError(f"{path}: no such trace file") from None
    except (OSError, ValueError, KeyError) as e:
        raise MerError(f"{path}: not a routing trace ({e})") from None
    if experts.ndim != 3 or starts[0] != 0 or starts[-1] != len(experts):
        raise MerError(f"{path}: inconsistent trace (experts {experts.shape}, seq_starts)")
    if hidden is not None and hidden.shape[:2] != experts.shape[:2]:
        raise MerError(f"{path}: hidden states {hidden.shape} do not match experts {experts.shape}")
    return Trace(experts, starts, phase, meta, weights, hidden)


def split_trace(trace: Trace, held_out: float = 0.5) -> tuple[Trace, Trace]:
    """(train, held-out): the first sequences, and the last `held_out` share of them.

    By whole sequences and in recording order, so what is learned from the first part
    (pins, predictors) is judged on sequences it never saw, as it would be when running."""
    n = trace.n_sequences
    if n < 2:
        raise MerError(f"a trace of {n} sequence cannot be split into train and held-out parts")
    if not 0 < held_out < 1:
        raise MerError(f"the held-out share must be between 0 and 1, got {held_out}")
    cut = min(max(1, round(n * (1 - held_out))), n - 1)
    return trace.select(range(cut)), trace.select(range(cut, n))
