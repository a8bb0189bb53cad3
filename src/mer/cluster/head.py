"""The head's side of a cluster: start the expert workers, and per MoE layer send each its
tokens in one call, the calls in flight together, and sum what comes back.

`ClusterExperts` stands where the expert cache stands in a single process (the model's
`experts`): `moe` replaces `mer.models.layers.moe` for the whole routed block, and it
answers `is_resident` from what the workers reported with their last answers, so a
self-speculative draft routes to experts in some worker's RAM without asking them.
The sum is the single process's: pairs sorted by expert, one token's products added in
that order, a batch's through the same `index_add_`, so outputs are equal token for token.

Faults: workers are Ray actors that Ray restarts when they die (`max_restarts`); a call
to a dead worker is sent again until it answers or `timeout` seconds have passed since
the layer was dispatched, then the layer fails with a ClusterError naming the worker.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mer.cache.expert_cache import CacheStats
from mer.cluster.placement import Key, holders
from mer.cluster.wire import pack_call, unpack_answer
from mer.errors import ClusterError, MerError
from mer.models.config import ModelConfig

RESTARTS = 16  # per worker; each restart reopens its store with a cold cache
FORWARDED_ENV = ("MER_CACHE_DIR", "MER_INT4_PATH")  # decide numerics: workers match the head


@dataclass
class DispatchStats:
    """Time and bytes of the head's MoE dispatches, measured as they happen."""

    layers: int = 0  # MoE layer dispatches
    calls: int = 0  # worker calls (a layer calls only the workers owning its chosen experts)
    retries: int = 0  # calls sent again after their worker died
    seconds: float = 0.0  # wall time of the dispatches, worker compute included
    prepare_seconds: float = 0.0  # splitting the pairs by worker, serialising, submitting
    wait_seconds: float = 0.0  # waiting for the answers (Ray's round trip and the work)
    merge_seconds: float = 0.0  # deserialising the answers and summing
    worker_seconds: float = 0.0  # per layer the slowest called worker's own time, summed
    bytes_sent: int = 0  # array bytes in the calls (hidden rows, pair rows, weights)
    bytes_received: int = 0  # array bytes of the answers

    @property
    def overhead_seconds(self) -> float:
        """Dispatch time not spent computing on a worker: serialisation, Ray, merging."""
        return self.seconds - self.worker_seconds


class ClusterExperts:
    """The model's expert provider when experts live on Ray workers."""

    policy = "lru"  # the head keeps no cache: each worker applies its own policy

    def __init__(
        self,
        config: ModelConfig,
        handles: list,
        owned: list[list[Key]],
        infos: list[dict],
        timeout: float = 60.0,
        started_ray: bool = False,
        movable: bool = True,
        replicas: int = 0,
        slots: int = 0,
    ) -> None:
        """`owned[i]`: the experts worker i serves (an expert on several workers is a
        replica); `movable`: whether every worker's store holds every expert (full copies,
        not shards), so that `rebalance` may move experts between workers; `replicas`: how
        many of the most loaded experts `rebalance` gives a second worker, within `slots`
        experts per worker (its cache's)."""
        self.config = config
        self.handles, self.infos = handles, infos
        self._run = [h.run for h in handles]  # Ray builds a method object per attribute access
        self.timeout = timeout
        self._started_ray = started_ray
        self.movable, self.replicas, self.slots = movable, replicas, slots
        self._row = {layer: j for j, layer in enumerate(config.moe_layers)}
        # served[w, j, e]: the pairs worker w computed for expert e of MoE layer j.
        n, shape = len(handles), (len(config.moe_layers), config.num_local_experts)
        self.served = np.zeros((n, *shape), np.int64)
        self.rebalance_every = 0  # forward passes between `rebalance`s at next_step (0: never)
        self.rebalances = 0  # placements that moved experts
        self._set_owned(owned)
        # worker -> layer -> its experts in RAM when it last answered
        self._resident: list[dict[int, set[int]]] = [{} for _ in handles]
        self.dispatch = DispatchStats()
        self.step = 0

    def _set_owned(self, owned: list[list[Key]]) -> None:
        """Per layer, precomputed: each expert's first worker, and its other workers."""
        self.owned = owned
        table = holders(self.config, owned)
        self.owner = {layer: np.array([h[0] for h in row]) for layer, row in table.items()}
        self._replicas = {
            layer: {e: h for e, h in enumerate(row) if len(h) > 1} for layer, row in table.items()
        }

    # --- the expert provider ----------------------------------------------------------

    def moe(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer: int):
        """`mer.models.layers.moe` with the experts on the workers. x [T, H] -> [T, H]."""
        t0 = time.perf_counter()
        t, k = ids.shape
        if k == 0:  # a draft pass with none of the layer's experts in RAM
            return torch.zeros_like(x)
        # The pairs sorted by expert, stably, as `moe` sorts them (numpy: a few µs where
        # the same steps in torch took ~100 µs of per-op overhead for one token).
        flat = ids.numpy().reshape(-1)
        order = np.argsort(flat, kind="stable")
        by_expert = flat[order]
        w = weights.float().numpy().reshape(-1)[order]
        wanted, counts = np.unique(by_expert, return_counts=True)
        expert_owner = self._assign(layer, wanted, counts)
        pair_owner = np.repeat(expert_owner, counts)
        single = t == 1
        tok = order // k
        calls, picks = {}, {}
        for wk in np.unique(expert_owner).tolist():
            mine = expert_owner == wk
            sel = np.flatnonzero(pair_owner == wk)
            if single:
                xs, rows = x, np.zeros(len(sel), np.int64)
            else:
                uniq, rows = np.unique(tok[sel], return_inverse=True)
                xs = x[torch.from_numpy(uniq)]
            calls[wk] = pack_call(layer, single, xs, wanted[mine], counts[mine], rows, w[sel])
            picks[wk] = torch.from_numpy(sel)
            self.served[wk, self._row[layer], wanted[mine]] += counts[mine]
            self.dispatch.bytes_sent += len(calls[wk])
        refs = {wk: self._run[wk].remote(call) for wk, call in calls.items()}
        t1 = time.perf_counter()
        answers = self._gather(layer, calls, refs, t0)
        t2 = time.perf_counter()
        ys = torch.empty(len(flat), x.shape[1], dtype=x.dtype)
        slowest = 0.0
        for wk, answer in answers.items():
            y, resident, seconds = unpack_answer(answer, x.dtype)
            ys[picks[wk]] = y
            self._resident[wk][layer] = set(resident)
            self.dispatch.bytes_received += len(answer)
            slowest = max(slowest, seconds)
        if single:  # as `moe`: one token's products added in expert order
            out = ys[0:1]
            for i in range(1, len(ys)):
                out = out + ys[i : i + 1]
        else:
            out = torch.zeros_like(x).index_add_(0, torch.from_numpy(tok), ys)
        d = self.dispatch
        t3 = time.perf_counter()
        d.layers += 1
        d.calls += len(calls)
        d.seconds += t3 - t0
        d.prepare_seconds += t1 - t0
        d.wait_seconds += t2 - t1
        d.merge_seconds += t3 - t2
        d.worker_seconds += slowest
        return out

    def _assign(self, layer: int, wanted: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The worker each wanted expert's pairs go to: its own, or for a replicated one
        the replica with the least of this layer's pairs so far (the experts with one
        worker counted first, the replicated heaviest first). All of one expert's pairs go
        to one worker: a matmul over a part of its rows may round differently."""
        out = self.owner[layer][wanted]
        replicas = self._replicas[layer]
        if not replicas:
            return out
        many = [i for i, e in enumerate(wanted.tolist()) if e in replicas]
        if not many:
            return out
        load = np.zeros(len(self.handles), np.int64)
        np.add.at(load, out, counts)
        for i in many:
            load[out[i]] -= counts[i]
        for i in sorted(many, key=lambda i: -counts[i]):
            out[i] = min(replicas[int(wanted[i])], key=lambda w: (load[w], w))
            load[out[i]] += counts[i]
        return out

    def _gather(self, layer: int, calls: dict, refs: dict, t0: float) -> dict:
        """Each worker's answer; a call whose worker died is sent again (Ray restarts the
        worker) until `timeout` seconds after the layer began."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        deadline = t0 + self.timeout
        out = {}
        for wk in refs:
            while True:
                try:
                    left = max(0.0, deadline - time.perf_counter())
                    out[wk] = ray.get(refs[wk], timeout=left)
                    break
                except RayActorError:
                    if time.perf_counter() >= deadline:
                        raise ClusterError(
                            f"worker {wk} died at MoE layer {layer} and was not back within "
                            f"{self.timeout:g} s"
                        ) from None
                    self.dispatch.retries += 1
                    time.sleep(0.05)
                    # Restarted, it serves what it was started with: tell it what it serves
                    # now (calls from one caller to an actor run in order).
                    self.handles[wk].set_owned.remote(self.owned[wk])
                    refs[wk] = self._run[wk].remote(calls[wk])
                except GetTimeoutError:
                    raise ClusterError(
                        f"worker {wk} did not answer MoE layer {layer} within {self.timeout:g} s"
                    ) from None
                except RayTaskError as e:
                    cause = e.cause
                    if isinstance(cause, MerError):
                        raise ClusterError(str(cause)) from None
                    raise
        return out

    def is_resident(self, layer: int, expert: int) -> bool:
        """In its worker's RAM when that worker last answered."""
        return any(expert in r.get(layer, ()) for r in self._resident)

    def is_held(self, layer: int, expert: int) -> bool:
        return self.is_resident(layer, expert)

    def use(self, layer: int, expert: int):
        raise ClusterError("the experts live on the cluster's workers: run them through moe()")

    def fetch(self, layer: int, experts) -> int:
        return 0  # each worker reads what its call needs

    def next_step(self) -> None:
        """After each forward pass: a safe point (no layer call in flight) to rebalance."""
        self.step += 1
        if self.rebalance_every and self.step % self.rebalance_every == 0:
            self.rebalance()

    @property
    def counts(self) -> np.ndarray:
        """[MoE layers, experts]: the pairs each expert computed so far, on any worker."""
        return self.served.sum(0)

    def rebalance(self) -> bool:
        """Place the experts again from the running counts (`mer.cluster.placement.place`,
        then `replicate` within the slots) and tell each worker what it serves now; True
        when anything moved. Only between layer calls: `moe` is synchronous, so anywhere
        outside it. The output does not change: every worker computes an expert the same
        way. Workers on shard stores hold only their shard, so they cannot take over others'
        experts: refused with a ClusterError."""
        import ray

        from mer.cluster.placement import place, replicate

        if not self.movable:
            raise ClusterError(
                "the workers serve shard stores (mer store split), each only its own experts: "
                "rebalancing moves experts, which needs a full copy of the store on every worker"
            )
        counts = self.counts
        owned = place(self.config, len(self.handles), counts)
        owned = replicate(self.config, owned, counts, self.replicas, self.slots)
        if owned == self.owned:
            return False
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            ray.get([h.set_owned.remote(k) for h, k in zip(self.handles, owned, strict=True)],
                    timeout=self.timeout)  # fmt: skip
        except (RayActorError, GetTimeoutError):
            # A worker restarting: the old placement stands (what a worker serves decides
            # only its prefetch and what it reports in RAM), tried again next time.
            return False
        self._set_owned(owned)
        self.rebalances += 1
        return True

    # --- what a Model asks of its cache -----------------------------------------------

    @property
    def n_slots(self) -> int:
        return sum(info.get("slots", 0) for info in self.infos)

    def describe(self) -> str:
        """One line: how many workers on how many nodes, each holding how many experts."""
        nodes = len({info["node"] for info in self.infos})
        held = "/".join(str(len(keys)) for keys in self.owned)
        n = len(self.handles)
        return (
            f"cluster: {n} worker{'s' if n > 1 else ''} on {nodes} node{'s' if nodes > 1 else ''}"
            f", experts per worker {held}, {self.n_slots} cache slots in all"
        )

    def worker_stats(self) -> list[dict]:
        import ray

        return ray.get([h.stats.remote() for h in self.handles], timeout=self.timeout)

    @property
    def stats(self) -> CacheStats:
        """The workers' cache counters, summed."""
        total = CacheStats()
        for s in self.worker_stats():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + s[name])
        return total

    def close(self) -> None:
        """Stop the workers (and the Ray instance, if opening the cluster started it)."""
        import ray

        if not ray.is_initialized():
            return
        for h in self.handles:
            ray.kill(h, no_restart=True)
        self.handles = []
        if self._started_ray:
            ray.shutdown()


def start(
    store: str | Path,
    config: ModelConfig,
    owned: list[list[Key]],
    budget: int,
    address: str | None = None,
    worker_stores: list[str | Path] | None = None,
    io_threads: int = 4,
    direct: bool = True,
    prefetch: bool = True,
    policy: str = "lru",
    pin_share: float = 0.0,
    threads: int = 1,
    timeout: float = 60.0,
    movable: bool = True,
    replicas: int = 0,
) -> ClusterExperts:
    """Start one worker per entry of `owned` (worker i serves owned[i] from `store`, or
    from worker_stores[i]), spread over the Ray cluster's nodes, and wait until each has
    opened its store; a worker that cannot start stops them all with its one-line error.
    `movable` and `replicas`: as `ClusterExperts` takes them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mer.cluster.session import connect
    from mer.cluster.worker import ExpertWorker

    # Absolute: a Ray worker's working directory is not the head's.
    stores = [str(Path(s).absolute()) for s in (worker_stores or [store] * len(owned))]
    if len(stores) != len(owned):
        raise ClusterError(f"{len(stores)} worker stores for {len(owned)} workers")
    started = connect(address)
    handles = []
    try:
        here = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        nodes = sorted(nodes, key=lambda n: (n == here, n))  # other machines first
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        actor = ray.remote(ExpertWorker)
        node_of = [nodes[i % len(nodes)] for i in range(len(owned))]
        for i, keys in enumerate(owned):
            sharing = node_of.count(node_of[i]) + (node_of[i] == here)
            handles.append(
                actor.options(
                    num_cpus=0,
                    max_restarts=RESTARTS,
                    max_task_retries=0,  # the head retries, within its time bound
                    # Hard: Ray's soft affinity put zero-CPU actors anywhere. A worker whose
                    # node is gone cannot come back: its layer call fails within the timeout.
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_of[i], soft=False),
                ).remote(
                    i,
                    stores[i],
                    keys,
                    budget,
                    io_threads,
                    direct,
                    prefetch,
                    policy,
                    pin_share,
                    threads,
                    env,
                    sharing,
                )  # fmt: skip
            )
        try:
            infos = ray.get([h.ready.remote() for h in handles], timeout=max(timeout, 120))
        except Exception as e:  # a worker process that cannot even import mer, say
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = lines[-1] if lines else type(e).__name__  # the cause, at the end of Ray's text
            raise ClusterError(f"expert workers did not start: {why}") from None
        for info in infos:
            if info["error"] is not None:
                raise ClusterError(info["error"])
    except BaseException:
        for h in handles:
            ray.kill(h, no_restart=True)
        if started:
            ray.shutdown()
        raise
    slots = min(info["slots"] for info in infos)
    return ClusterExperts(config, handles, owned, infos, timeout, started, movable, replicas, slots)
