"""Routing traces: which experts each token chose at each MoE layer, in one `.npz` file.

The layout is the one of `shared/traces/README.md`, so our recorded traces and
published ones load with the same code: `experts` int16 [tokens, layers, top_k],
`seq_starts` int64 [sequences + 1], `phase` int8 [tokens] (0 prefill, 1 decode),
`meta` a JSON string (model, n_experts, top_k, moe_layers, ...). Our traces may
add `weights` float16 [tokens, layers, top_k] (router weights of the choices).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mer.errors import MerError


@dataclass
class Trace:
    experts: np.ndarray  # int16 [tokens, layers, top_k]
    seq_starts: np.ndarray  # int64 [sequences + 1]
    phase: np.ndarray  # int8 [tokens]
    meta: dict = field(default_factory=dict)
    weights: np.ndarray | None = None  # float16 [tokens, layers, top_k]

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

    def head(self, max_tokens: int) -> Trace:
        """The whole sequences that fit in the first `max_tokens` tokens (at least one)."""
        cut = int(np.searchsorted(self.seq_starts, max_tokens, side="right")) - 1
        cut = max(cut, 1)
        end = int(self.seq_starts[cut])
        w = None if self.weights is None else self.weights[:end]
        return Trace(self.experts[:end], self.seq_starts[: cut + 1], self.phase[:end], self.meta, w)

    def save(self, path: str | Path) -> None:
        arrays = dict(
            experts=self.experts.astype(np.int16),
            seq_starts=self.seq_starts.astype(np.int64),
            phase=self.phase.astype(np.int8),
            meta=np.array(json.dumps(self.meta)),
        )
        if self.weights is not None:
            arrays["weights"] = self.weights.astype(np.float16)
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
    except FileNotFoundError:
        raise MerError(f"{path}: no such trace file") from None
    except (OSError, ValueError, KeyError) as e:
        raise MerError(f"{path}: not a routing trace ({e})") from None
    if experts.ndim != 3 or starts[0] != 0 or starts[-1] != len(experts):
        raise MerError(f"{path}: inconsistent trace (experts {experts.shape}, seq_starts)")
    return Trace(experts, starts, phase, meta, weights)
