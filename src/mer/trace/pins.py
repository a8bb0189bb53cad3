"""Pin files: read the experts a user asks to keep in RAM into keys for the cache.

A pin file is a JSON list of `[layer, expert]` pairs (model layer numbers, as the
store names experts), pinned whole, or a routing trace (`.npz`) whose experts are
offered most often chosen first, for the cache to take as many as its pin share
allows. Errors name the file. The cache itself knows nothing of files
(`mer.cache.pinning.Pins`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mer.cache.pinning import Pins, check_pairs, most_frequent
from mer.config import ModelConfig
from mer.errors import ConfigError, MerError
from mer.trace.format import load_trace


def read_pin_file(path: str | Path, config: ModelConfig, share: float) -> Pins:
    """The pins a file names: its JSON pairs, or the experts of a trace ranked by use
    (which needs `share` > 0 to say how many to take)."""
    path = Path(path)
    if path.suffix == ".npz":
        if not share:
            raise ConfigError(
                f"{path}: a trace as pin file needs --pin-share to say how many to pin"
            )
        return Pins(_ranked_from_trace(path, config), ranked=True, where=str(path))
    try:
        pairs = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pin file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON list of [layer, expert] pairs ({e})") from None
    return Pins(tuple(check_pairs(pairs, config, str(path))), where=str(path))


def _ranked_from_trace(path: Path, config: ModelConfig) -> tuple[tuple[int, int], ...]:
    try:
        trace = load_trace(path)
    except MerError as e:
        raise ConfigError(str(e)) from None
    layers, n = config.moe_layers, config.num_local_experts
    if (trace.n_layers, trace.n_experts) != (len(layers), n):
        raise ConfigError(
            f"{path}: trace of {trace.n_layers} MoE layers x {trace.n_experts} experts, "
            f"the model has {len(layers)} x {n}"
        )
    counts = expert_counts(trace.experts, n)
    return tuple((layers[int(i) // n], int(i) % n) for i in most_frequent(counts, len(counts)))


def expert_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """How often each (layer ordinal, expert) was chosen: int64 [layers * n_experts]."""
    layers = experts.shape[1]
    keys = experts.astype(np.int64) + np.arange(layers)[None, :, None] * n_experts
    return np.bincount(keys.reshape(-1), minlength=layers * n_experts)
