"""Which worker owns which expert: disjoint sets, balancing measured load.

Per MoE layer, the experts go to workers heaviest first (longest processing time
first), each to the worker with the least load of that layer so far, ties to the one
holding the fewest experts over all layers: every worker gets at most ceil(E / N)
experts of a layer, so the RAM each needs stays even, and the calls of one layer take
about the same time. Without counts every expert weighs the same: an equal split.
Load counts come from a routing trace (`counts_from_trace`) or from a run's own counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mer.errors import ConfigError
from mer.models.config import ModelConfig

Key = tuple[int, int]  # (layer, expert)


def place(config: ModelConfig, n_workers: int, counts: np.ndarray | None = None) -> list[list[Key]]:
    """The experts of each of `n_workers` workers; `counts` [MoE layers, experts] weighs them
    (how often each was chosen), in the order of `config.moe_layers`."""
    layers, n_experts = config.moe_layers, config.num_local_experts
    if n_workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {n_workers}")
    if n_workers > n_experts:
        raise ConfigError(
            f"--workers {n_workers}: more workers than experts per layer ({n_experts})"
        )
    if counts is None:
        counts = np.ones((len(layers), n_experts))
    if counts.shape != (len(layers), n_experts):
        raise ConfigError(
            f"expert load of shape {counts.shape} does not fit the model "
            f"({len(layers)} MoE layers x {n_experts} experts)"
        )
    cap = math.ceil(n_experts / n_workers)
    owned: list[list[Key]] = [[] for _ in range(n_workers)]
    for j, layer in enumerate(layers):
        load = [0.0] * n_workers
        held = [0] * n_workers
        for e in sorted(range(n_experts), key=lambda e: (-counts[j, e], e)):
            w = min(
                (w for w in range(n_workers) if held[w] < cap),
                key=lambda w: (load[w], len(owned[w]), w),
            )
            owned[w].append((layer, e))
            load[w] += float(counts[j, e])
            held[w] += 1
    return [sorted(keys) for keys in owned]


def counts_from_trace(path: str | Path, config: ModelConfig) -> np.ndarray:
    """[MoE layers, experts]: how often a routing trace's tokens chose each expert."""
    from mer.trace.format import load_trace

    trace = load_trace(path)
    n = config.num_local_experts
    if trace.n_layers != len(config.moe_layers) or trace.n_experts > n:
        raise ConfigError(
            f"{path}: a trace of {trace.n_layers} MoE layers x {trace.n_experts} experts, "
            f"not of this model ({len(config.moe_layers)} x {n})"
        )
    ex = trace.experts.astype(np.int64)
    return np.stack([np.bincount(ex[:, m].reshape(-1), minlength=n) for m in range(ex.shape[1])])


def owner_table(config: ModelConfig, owned: list[list[Key]]) -> dict[int, list[int]]:
    """layer -> [worker of expert 0, worker of expert 1, ...]; every expert has one owner."""
    table = {layer: [-1] * config.num_local_experts for layer in config.moe_layers}
    for w, keys in enumerate(owned):
        for layer, e in keys:
            if table[layer][e] != -1:
                raise ConfigError(f"expert {e} of layer {layer} is placed on two workers")
            table[layer][e] = w
    for layer, row in table.items():
        if -1 in row:
            raise ConfigError(f"expert {row.index(-1)} of layer {layer} has no worker")
    return table
