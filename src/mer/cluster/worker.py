"""An expert worker: a store (a full copy or a shard), its own RAM cache, read engine and
router-lookahead prefetch, and one call per MoE layer computing the experts it owns.

`ExpertWorker` is a plain class (Ray makes it an actor in `mer.cluster.head`), so it
runs and is tested without Ray as well. A call brings the rows of the tokens routed to
this worker's experts, and for each (token, expert) pair in the head's order (sorted by
expert, as `mer.models.layers.moe` sorts them) the row index, the expert and the router
weight; it returns each pair's weighted output in the head's dtype, in that order. The
head does the final sum, exactly as the single process does, so results do not depend on
the number of workers or on which worker owns what.

A worker that cannot start (store missing, corrupted, without the experts it is given,
budget too small) does not raise in its constructor, where Ray would restart it in a
loop: it keeps the one-line error, which `ready()` reports and every call raises.
"""

from __future__ import annotations

import dataclasses
import os
import time
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mer.cluster.wire import pack_answer, unpack_call
from mer.errors import ClusterError, MerError, StoreError
from mer.models.layers import run_resident_first

Key = tuple[int, int]


class ExpertWorker:
    def __init__(
        self,
        index: int,
        store: str | Path,
        experts: list[Key],
        budget: int,
        io_threads: int = 4,
        direct: bool = True,
        prefetch: bool = True,
        policy: str = "lru",
        pin_share: float = 0.0,
        threads: int = 1,
        env: dict[str, str] | None = None,
        sharing: int = 1,
    ) -> None:
        """Worker `index` of a cluster serves `experts` ((layer, expert) pairs) from `store`
        with `budget` bytes of expert cache; `env`: variables the head's process had that
        decide numerics here (the int4 path, the kernel cache), set before anything runs.
        `sharing`: the processes of the cluster computing on this machine (its workers, and
        the head if here); compute threads are capped at this machine's share of cores,
        since threads beyond the cores only spin and wait for each other."""
        os.environ.update(env or {})
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) // max(1, sharing))))
        self.index, self.where = index, str(store)
        self.error: str | None = None
        self._last_layer = -1
        try:
            self._open(Path(store), [tuple(k) for k in experts], budget, io_threads, direct,
                       prefetch, policy, pin_share)  # fmt: skip
        except MerError as e:
            self.error = f"worker {index} (store {store}): {e}"

    def _open(self, path, experts, budget, io_threads, direct, prefetch, policy, pin_share):
        from mer.cache.expert_cache import ExpertCache
        from mer.store.reader import Store

        store = Store(path)
        cfg = self.config = store.config
        if missing := [k for k in experts if k not in store.extents]:
            layer, e = missing[0]
            raise StoreError(
                f"{store.manifest_path}: has no expert {e} of layer {layer}, which this worker "
                f"serves ({len(missing)} of its {len(experts)} missing)"
            )
        self.cache = ExpertCache(
            store, budget, threads=io_threads, direct=direct, policy=policy, pin_share=pin_share
        )
        self.experts = cfg.family.experts(cfg, self.cache)  # the family's activation, if its own
        self.set_owned(experts)
        self.next_layer = dict(pairwise(cfg.moe_layers))
        self._router = None
        if prefetch:  # the routers alone (float32): what router lookahead multiplies
            names = [n for n in store.dense_table if ".router" in n]
            routers = {n: t.float() for n, t in store.load_dense(names=names).items()}
            self._router = SimpleNamespace(config=cfg, w=routers, family=cfg.family)

    def set_owned(self, experts: list[Key]) -> None:
        """Serve `experts` ((layer, expert) pairs) from now on: what router lookahead
        prefetches and what the answers report in RAM. (A call computes whatever experts
        it names; the store must hold them.)"""
        if self.error is not None:
            raise ClusterError(self.error)
        keys = [tuple(k) for k in experts]
        if missing := [k for k in keys if k not in self.cache.store.extents]:
            layer, e = missing[0]
            raise ClusterError(
                f"worker {self.index} (store {self.where}): has no expert {e} of layer {layer}"
            )
        self.owned: dict[int, list[int]] = {}
        for layer, e in sorted(keys):
            self.owned.setdefault(layer, []).append(e)

    def ready(self) -> dict:
        """Whether this worker runs, where (node, pid), and its cache's size."""
        import ray

        out = {"error": self.error, "pid": os.getpid(), "index": self.index}
        out["node"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        if self.error is None:
            out.update(slots=self.cache.n_slots, experts=sum(map(len, self.owned.values())))
        return out

    def run(self, call: bytes) -> bytes:
        """The weighted output of each (token, expert) pair of one MoE layer that this
        worker owns. `call` (`wire.pack_call`): the layer, whether the head's batch is one
        token (whose products the single process rounds to the dtype before summing), the
        pairs' experts ascending and how many pairs each has (pairs are grouped by expert),
        each pair's row in x and router weight, and x [R, H], the distinct token rows.
        Returns `wire.pack_answer`'s bytes: the outputs [n, H] in x's dtype, this layer's
        experts now in RAM, and the seconds the call took here."""
        t0 = time.perf_counter()
        if self.error is not None:
            raise ClusterError(self.error)
        layer, single, dt, experts, counts, rows, weights, x = unpack_call(call)
        if layer <= self._last_layer:  # a new forward pass began at the head
            self.cache.next_step()
        self._last_layer = layer
        if self.cache.policy != "lru":
            self.cache.observe(layer, torch.tensor(experts))
        if self._router is not None:
            self._lookahead(layer, x, experts)
        y = self._compute(layer, x, rows, experts, counts, weights, single, dt)
        resident = [e for e in self.owned.get(layer, ()) if self.cache.is_resident(layer, e)]
        return pack_answer(y, resident, time.perf_counter() - t0)

    def _lookahead(self, layer: int, x: torch.Tensor, experts: list[int]) -> None:
        """As `mer.predict.lookahead.LookaheadPrefetcher`, over the experts owned here."""
        self.cache.cancel_prefetches(layer, keep=experts)
        nxt = self.next_layer.get(layer)
        mine = self.owned.get(nxt)
        if nxt is None or not mine:
            return
        m = self._router
        _, guess = m.family.route(m, nxt, x.float(), None)
        own = set(mine)
        self.cache.prefetch(nxt, [e for e in guess.unique().tolist() if e in own])

    def _compute(self, layer, x, rows, experts, counts, w, single, dt) -> torch.Tensor:
        """Each pair's expert output times its weight: the arithmetic of
        `mer.models.layers.moe`, pair for pair (resident experts first, the missing ones
        read in parallel meanwhile)."""
        ends = np.cumsum(counts).tolist()
        span = dict(zip(experts, zip([0, *ends[:-1]], ends, strict=True), strict=True))
        xs = x if single else x[rows]
        ys = torch.empty(len(rows), x.shape[1], dtype=dt)

        def run(e: int, ffn) -> None:
            a, b = span[e]
            if single:  # one token: x is its row, each expert has one pair
                ys[a] = (ffn(xs) * w[a]).to(dt)[0]
            else:
                ys[a:b] = ffn(xs[a:b])

        run_resident_first(self.experts, layer, experts, run)
        return ys if single else (ys * w[:, None]).to(dt)

    def stats(self) -> dict:
        """The cache's counters (`CacheStats` fields) and its slots."""
        if self.error is not None:
            raise ClusterError(self.error)
        return {**dataclasses.asdict(self.cache.stats), "slots": self.cache.n_slots}

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.error is None:
            self.cache.engine.close()
