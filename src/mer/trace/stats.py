"""Routing statistics of a trace, in the terms of the Mixtral paper's routing analysis.

Per MoE layer: how often consecutive tokens of a sequence pick the same first-choice
expert, how often their top-k sets share at least one expert, and how evenly the
experts are loaded, each next to what uniformly random routing would give. And
across sequences: how many reads batching saves when n sequences decode together
(`batch_dedup`), which bounds what continuous batching can save on SSD reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb, log

import numpy as np

from mer.trace.format import Trace


@dataclass(frozen=True)
class LayerStats:
    layer: int
    same_first: float | None  # None when the trace's order of choices carries nothing
    overlap: float
    max_share: float  # busiest expert's share of assignments (uniform: 1 / E)
    min_share: float
    entropy: float  # of the load, over log(E): 1 is perfectly even


def random_same_first(n_experts: int) -> float:
    return 1 / n_experts


def random_overlap(n_experts: int, top_k: int) -> float:
    """Chance two independent random top-k sets share at least one expert."""
    return 1 - comb(n_experts - top_k, top_k) / comb(n_experts, top_k)


def routing_stats(trace: Trace) -> list[LayerStats]:
    e = trace.n_experts
    names = trace.meta.get("moe_layers")  # our traces list them; others may give a count
    names = names if isinstance(names, list) else list(range(trace.n_layers))
    pairs = np.ones(trace.n_tokens, dtype=bool)  # token t has a predecessor in its sequence
    pairs[trace.seq_starts[:-1]] = False
    prev, cur = np.nonzero(pairs)[0] - 1, np.nonzero(pairs)[0]
    ordered = trace.weights is not None
    out = []
    for m in range(trace.n_layers):
        ex = trace.experts[:, m, :].astype(np.int64)
        a, b = ex[prev], ex[cur]
        shared = (a[:, :, None] == b[:, None, :]).any(-1).any(-1)
        load = np.bincount(ex.reshape(-1), minlength=e) / ex.size
        nz = load[load > 0]
        out.append(
            LayerStats(
                layer=int(names[m]),
                same_first=float((a[:, 0] == b[:, 0]).mean()) if ordered and len(a) else None,
                overlap=float(shared.mean()) if len(a) else 0.0,
                max_share=float(load.max()),
                min_share=float(load.min()),
                entropy=float(-(nz * np.log(nz)).sum() / log(e)),
            )
        )
    return out


def random_dedup(n_experts: int, top_k: int, n: int) -> float:
    """`batch_dedup` of uniformly random routing: n * k choices over the expected union."""
    return n * top_k / (n_experts * (1 - (1 - top_k / n_experts) ** n))


def batch_dedup(trace: Trace, n: int, samples: int = 2000, seed: int = 0) -> float:
    """Experts chosen per distinct expert read when `n` sequences decode one token each in
    the same step: n * top_k over the size of their union, averaged over layers and over
    `samples` draws of n different sequences and a random token of each. Decoding agents
    are at unrelated points of unrelated conversations, hence random tokens."""
    if not 1 <= n <= trace.n_sequences:
        raise ValueError(f"{n} sequences: the trace has {trace.n_sequences}")
    rng = np.random.default_rng(seed)
    lengths = np.diff(trace.seq_starts)
    seqs = np.argsort(rng.random((samples, trace.n_sequences)), axis=1)[:, :n]  # [S, n]
    tokens = trace.seq_starts[seqs] + (rng.random((samples, n)) * lengths[seqs]).astype(np.int64)
    chosen = trace.experts[tokens].astype(np.int64)  # [S, n, L, k]
    hot = np.zeros((samples, trace.n_layers, trace.n_experts), dtype=bool)
    s, _, layer, _ = np.indices(chosen.shape, sparse=True)
    hot[s, layer, chosen] = True
    union = hot.sum(-1).mean()
    return n * trace.top_k / float(union)
