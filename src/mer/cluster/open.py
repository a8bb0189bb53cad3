"""`mer.open(..., cluster=...)`'s part: check the options, place the experts, start the
workers. What the single process does on its own (a memory target for the whole process,
pinned experts from a file, compact dense weights, history-based prefetch) is refused
with a one-line error here rather than silently ignored."""

from __future__ import annotations

from pathlib import Path

from mer.errors import ConfigError


def open_experts(
    store,
    cluster: str,
    workers: int | None,
    budget: int,
    worker_stores: list[str | Path] | None,
    placement_trace: str | Path | None,
    timeout: float,
    *,
    io_threads: int,
    direct: bool,
    prefetch: bool | str,
    policy: str,
    pin_share: float,
    threads: int,
    refused: dict,
    replicas: int = 0,
    rebalance_every: int = 0,
):
    """A started `ClusterExperts` for the opened head store `store` (a `Store`); `replicas`
    of the most loaded experts on a second worker where the budget has room for them, and
    experts placed again from the running counts every `rebalance_every` forward passes
    (`ClusterExperts.rebalance`); both need a full copy of the store on every worker."""
    from mer.cluster.head import start
    from mer.cluster.placement import counts_from_trace, place, replicate
    from mer.cluster.session import parse_cluster

    flags = {"memory": "--memory", "pin_file": "--pin-file", "dense_quant": "--dense-quant"}
    for name, given in refused.items():
        if given:
            raise ConfigError(f"{flags[name]} is not supported with --cluster yet")
    if prefetch not in (True, False, "lookahead", "off"):
        raise ConfigError(
            f"--prefetch {prefetch} is not supported with --cluster: workers prefetch by router "
            "lookahead (or not, with --no-prefetch)"
        )
    if replicas < 0 or rebalance_every < 0:
        raise ConfigError(
            f"replicas and rebalance interval must be 0 or more, got {replicas}, {rebalance_every}"
        )
    if not timeout > 0:
        raise ConfigError(f"cluster timeout must be positive, got {timeout}")
    address, local_n = parse_cluster(cluster)
    if workers is not None and local_n is not None and workers != local_n:
        raise ConfigError(f"--cluster {cluster} and --workers {workers} disagree")
    if worker_stores and workers is not None and len(worker_stores) != workers:
        raise ConfigError(f"{len(worker_stores)} worker stores for --workers {workers}")
    n = workers or local_n or (len(worker_stores) if worker_stores else 1)
    cfg = store.config
    owned = shard_placement(worker_stores, cfg) if worker_stores else None
    # Stores the head cannot read may be shards: only the head's own path is known whole.
    movable = not worker_stores or all(full_copy(p) for p in worker_stores)
    if (replicas or rebalance_every) and not movable:
        raise ConfigError(
            "replicated or rebalanced experts need a full copy of the store on every worker; "
            "a shard store (mer store split) serves only its own experts"
        )
    if owned is None:
        counts = counts_from_trace(placement_trace, cfg) if placement_trace else None
        owned = place(cfg, n, counts)
        owned = replicate(cfg, owned, counts, replicas, budget // store.expert_format.nbytes)
    experts = start(
        store.path, cfg, owned, budget, address, worker_stores, io_threads=io_threads,
        direct=direct, prefetch=prefetch in (True, "lookahead"), policy=policy,
        pin_share=pin_share, threads=threads, timeout=timeout, movable=movable,
        replicas=replicas,
    )  # fmt: skip
    experts.rebalance_every = rebalance_every
    return experts


def full_copy(path) -> bool:
    """Whether the head can read the store at `path` and it is not a shard."""
    from mer.errors import StoreError
    from mer.store.reader import Store

    try:
        return Store(path).shard is None
    except StoreError:
        return False


def shard_placement(worker_stores, cfg):
    """The experts each shard store's manifest says it holds, where the head can read them
    all; else None, and the experts are placed again as `mer store split` placed them (give
    the same --placement-trace if it had one): each worker checks it holds its experts."""
    from mer.errors import StoreError
    from mer.store.reader import Store

    owned = []
    for path in worker_stores:
        try:
            s = Store(path)
        except StoreError:
            return None  # on another machine, or broken: the worker will say which
        if s.shard is None or s.config.expert_keys() != cfg.expert_keys():
            return None
        owned.append(sorted(s.extents))
    return owned
