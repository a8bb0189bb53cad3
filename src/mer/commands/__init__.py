"""One module per `mer` command: its options (`add_arguments`) beside the function that
runs it (`run`, typed keyword parameters). `mer.cli` imports only the chosen one."""

from __future__ import annotations

from mer.options import IOOptions, SpeculationOptions


def open_model(store, ram_budget: int | None, io: IOOptions, memory: int | None = None, **kw):
    """mer.open with the reader options every generating command takes; with `memory`
    (the whole process's target) the expert cache gets what it leaves, and the split is
    printed once. --ram-budget and --memory exclude each other."""
    import sys

    import mer.api
    from mer.errors import ConfigError

    if memory is not None and ram_budget is not None:
        raise ConfigError("give --memory (the whole process) or --ram-budget (experts), not both")
    model = mer.api.open(
        store, 4 << 30 if ram_budget is None else ram_budget, direct_io=not io.no_direct_io,
        io_threads=io.io_threads, prefetch="off" if io.no_prefetch else io.prefetch,
        speculator=io.speculator, cache_policy=io.cache_policy,
        pin_share=io.pin_share, pin_file=io.pin_file, compute_threads=io.threads,
        routing=io.routing, routing_slack=io.routing_slack, memory=memory, **kw,
    )  # fmt: skip
    if model.memory is not None:
        sys.stderr.write(model.memory.line() + "\n")
    describe = getattr(model.cache, "describe", None)  # experts on a cluster's workers
    if describe is not None:
        sys.stderr.write(describe() + "\n")
    return model


def open_draft(speculation: SpeculationOptions, dtype: str):
    """The draft the speculation options ask for: "self", an opened Model, or None."""
    if speculation.draft:
        import mer.api

        return mer.api.open(speculation.draft, speculation.draft_ram_budget, dtype=dtype)
    return "self" if speculation.speculate else None
