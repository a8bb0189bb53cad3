"""Forced routing: the real engine runs, but each token routes as a recorded trace says.

A random-weight model routes almost uniformly, so its cache and prefetch figures say
nothing about a real model's; a trace holds a real model's routing but no weights. Set
as the model's `routing_override`, `TraceRouting` replaces each MoE layer's choice with
the experts the trace recorded for that token and layer: the router still runs (its
cost is real), and every read, cache decision, prefetch and expert FFN is the engine's.
The weights are the trace's when it recorded them, else the router's probabilities of
the trace's experts (renormalised as the model does), so outputs stay finite; they are
text from random weights and mean nothing.

Which trace tokens a forward pass runs is said before it (`feed`): one row per token
of the pass, in the pass's order. The trace's shape (MoE layers, experts, top-k) must
be the model's, else a one-line error. In a server (`mer serve --routing-trace`),
`BatchFeeder` says it for each scheduled batch: each request is given the trace's
sequences in turn, and its token at position p takes that sequence's row p (wrapping
round a sequence shorter than the request).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mer.config import ModelConfig
from mer.errors import ConfigError
from mer.trace.format import Trace


def check_trace_shape(trace: Trace, config: ModelConfig, where: str, store: str = "the store"):
    """The trace must route the model's MoE layers, experts and top-k."""
    have = (trace.n_layers, trace.n_experts, trace.top_k)
    want = (len(config.moe_layers), config.num_local_experts, config.num_experts_per_tok)
    if have != want or (trace.n_tokens and int(trace.experts.max()) >= want[1]):
        raise ConfigError(
            f"{where}: routing of {have[0]} MoE layers x {have[1]} experts, top-{have[2]} does "
            f"not match {store} ({want[0]} x {want[1]}, top-{want[2]})"
        )


class TraceRouting:
    """A routing override (`MoETransformer.routing_override`) that routes each token of a
    forward pass as the trace's row given for it by `feed`."""

    def __init__(self, trace: Trace, config: ModelConfig, routers: dict[int, torch.Tensor],
                 where: str = "the trace", store: str = "the store") -> None:  # fmt: skip
        """`routers`: MoE layer -> router weight [E, H] (for weights the trace lacks)."""
        check_trace_shape(trace, config, where, store)
        self.trace = trace
        self.norm_topk = config.norm_topk_prob
        self.routers = routers
        self._column = {layer: j for j, layer in enumerate(config.moe_layers)}
        self._last = config.moe_layers[-1]
        self._rows: np.ndarray | None = None
        self.passes = 0  # forward passes routed from the trace

    @classmethod
    def for_model(cls, trace: Trace, transformer, where: str = "the trace", store="the store"):
        cfg = transformer.config
        routers = {m: transformer.w[f"layers.{m}.router"] for m in cfg.moe_layers}
        return cls(trace, cfg, routers, where, store)

    def feed(self, rows: Sequence[int] | np.ndarray) -> None:
        """The trace rows (token indices) of the next forward pass's tokens, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.trace.n_tokens):
            raise ValueError(f"trace rows outside 0..{self.trace.n_tokens - 1}")
        self._rows = rows

    def __call__(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        rows = self._rows
        if rows is None:
            raise RuntimeError("forced routing: no trace rows fed for this forward pass")
        if len(rows) != ids.shape[0]:
            raise RuntimeError(f"forced routing: {len(rows)} trace rows fed for a pass of "
                               f"{ids.shape[0]} tokens")  # fmt: skip
        j = self._column[layer]
        forced = torch.from_numpy(self.trace.experts[rows, j].astype(np.int64))  # [T, k]
        if self.trace.weights is not None:
            w = torch.from_numpy(self.trace.weights[rows, j].astype(np.float32))
        else:
            router = self.routers[layer]  # bf16, or float32 where the family keeps it so
            probs = F.softmax(F.linear(hidden.to(router.dtype), router).float(), dim=-1)  # [T, E]
            w = probs.gather(1, forced)
            if self.norm_topk:
                w = w / w.sum(-1, keepdim=True)
        if layer == self._last:  # the pass is routed: the next one needs rows of its own
            self._rows = None
            self.passes += 1
        return w, forced


class BatchFeeder:
    """Feeds a `TraceRouting` the rows of each batch the scheduler runs
    (`mer.engine.runner.ModelRunner`'s `before_forward`): request by request, the trace's
    sequences in turn, position p of a request taking its sequence's row p (modulo its
    length), prompt and generated tokens alike. Only sequences of at least `min_length`
    tokens are used (all when none is that long), so few requests wrap round."""

    def __init__(self, routing: TraceRouting, min_length: int = 64) -> None:
        self.routing = routing
        trace = routing.trace
        spans = list(trace.sequences())
        long = [(a, b) for a, b in spans if b - a >= min_length]
        self.spans = long or spans
        self._given: dict[int, tuple[int, int]] = {}  # request id -> (start, length)

    def rows(self, request_id: int, first: int, n: int) -> np.ndarray:
        """Trace rows of positions first..first+n-1 of a request."""
        if request_id not in self._given:  # (a few bytes a request: never dropped)
            a, b = self.spans[len(self._given) % len(self.spans)]
            self._given[request_id] = (a, b - a)
        start, length = self._given[request_id]
        return start + np.arange(first, first + n) % length

    def __call__(self, batch) -> np.ndarray:
        """Feed the rows of a batch (`mer.engine.batching.Batch`) about to run as one pass;
        returns them."""
        rows = [self.rows(s.request.id, s.kv.length, len(c))
                for s, c in zip(batch.seqs, batch.chunks, strict=True)]  # fmt: skip
        fed = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.routing.feed(fed)
        return fed


def decode_sequences(transformer, routing: TraceRouting, sequences, on_pass=None) -> float:
    """Decode whole sequences of `routing.trace`, one token per forward pass, `sequences`
    (lists of sequence indices) at a time: [[i], [j], ...] one after another, [[i, j, ...]]
    together in one batch (each pass takes the next token of every sequence not yet done).
    Each pass routes as the trace's rows for those tokens; the input token is the last
    pass's argmax (random weights: the text means nothing). `on_pass(group, tokens)` is
    called before each pass. Returns the seconds spent in forward passes."""
    trace, spent = routing.trace, 0.0
    for group in sequences:
        bounds = [(int(trace.seq_starts[i]), int(trace.seq_starts[i + 1])) for i in group]
        kvs = [transformer.new_kv_cache(b - a) for a, b in bounds]
        tokens = [1] * len(group)  # BOS-like start; then each sequence's own argmax
        for t in range(max(b - a for a, b in bounds)):
            live = [n for n, (a, b) in enumerate(bounds) if a + t < b]
            if on_pass is not None:
                on_pass(group, len(live))
            routing.feed([bounds[n][0] + t for n in live])
            batch = [(torch.tensor([tokens[n]]), kvs[n]) for n in live]
            t0 = time.perf_counter()
            logits = transformer.forward_batch(batch)
            spent += time.perf_counter() - t0
            for n, row in zip(live, logits.argmax(-1).tolist(), strict=True):
                tokens[n] = row
    return spent
