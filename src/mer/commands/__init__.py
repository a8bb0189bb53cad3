"""One module per `mer` command: its options (`add_arguments`) beside the function that
runs it (`run`, typed keyword parameters). `mer.cli` imports only the chosen one."""

from __future__ import annotations

from mer.options import IOOptions, SpeculationOptions


def open_model(store, ram_budget: int, io: IOOptions, **kw):
    """mer.open with the reader options every generating command takes."""
    import mer.api

    return mer.api.open(
        store, ram_budget, direct_io=not io.no_direct_io, io_threads=io.io_threads,
        prefetch="off" if io.no_prefetch else io.prefetch, speculator=io.speculator,
        cache_policy=io.cache_policy, pin_share=io.pin_share,
        pin_file=io.pin_file, compute_threads=io.threads, **kw,
    )  # fmt: skip


def open_draft(speculation: SpeculationOptions, dtype: str):
    """The draft the speculation options ask for: "self", an opened Model, or None."""
    if speculation.draft:
        import mer.api

        return mer.api.open(speculation.draft, speculation.draft_ram_budget, dtype=dtype)
    return "self" if speculation.speculate else None
