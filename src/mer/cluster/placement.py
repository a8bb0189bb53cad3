"""Which worker owns which expert: disjoint sets, balancing measured load.

Per MoE layer, the experts go to workers heaviest first (longest processing time
first), each to the worker with the least load of that layer so far, ties to the one
holding the fewest experts over all layers: every worker gets at most ceil(E / N)
experts of a layer, so the RAM each needs stays even, and the calls of one layer take
about the same time. Without counts every expert weighs the same: an equal split.
Load counts come from a routing trace (`counts_from_trace`) or from a run's own counts
(`mer.cluster.head.ClusterExperts.counts`).

Then, when the budgets allow, the most loaded experts are replicated (`replicate`): each
gets one more worker, one with a free cache slot for it, so the head can send a layer's
work for it to whichever of its workers has least of that layer's work (`holders`).
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


def replicate(
    config: ModelConfig, owned: list[list[Key]], counts: np.ndarray | None, n: int, slots: int
) -> list[list[Key]]:
    """`owned` with the `n` most loaded experts (by `counts`, as in `place`; the first ones
    of each layer in turn without) each on one more worker: the one with the least share of
    that layer's load (an expert's load split evenly over its workers) among those holding
    fewer than `slots` experts, where the budgets allow; experts with no such worker keep
    one. Experts a worker holds beyond its cache's slots would only be read again and again."""
    if n <= 0 or len(owned) < 2:
        return [sorted(keys) for keys in owned]
    layers, n_experts = config.moe_layers, config.num_local_experts
    if counts is None:
        counts = np.ones((len(layers), n_experts))
    table = holders(config, owned)
    out = [set(keys) for keys in owned]
    hottest = sorted(((j, e) for j in range(len(layers)) for e in range(n_experts)),
                     key=lambda je: (-counts[je], je[1], je[0]))  # fmt: skip
    for j, e in hottest[:n]:
        layer, row = layers[j], table[layers[j]]
        share = [0.0] * len(owned)  # each worker's part of this layer's load
        for x, ws in enumerate(row):
            for w in ws:
                share[w] += float(counts[j, x]) / len(ws)
        free = [w for w in range(len(owned)) if w not in row[e] and len(out[w]) < slots]
        if free:
            w = min(free, key=lambda w: (share[w], len(out[w]), w))
            row[e] = (*row[e], w)
            out[w].add((layer, e))
    return [sorted(keys) for keys in out]


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


def holders(config: ModelConfig, owned: list[list[Key]]) -> dict[int, list[tuple[int, ...]]]:
    """layer -> [the workers holding expert 0, ...]: `owner_table` allowing replicas."""
    table: dict[int, list[tuple[int, ...]]] = {
        layer: [()] * config.num_local_experts for layer in config.moe_layers
    }
    for w, keys in enumerate(owned):
        for layer, e in keys:
            if w not in table[layer][e]:
                table[layer][e] = (*table[layer][e], w)
    for layer, row in table.items():
        if () in row:
            raise ConfigError(f"expert {row.index(())} of layer {layer} has no worker")
    return table
