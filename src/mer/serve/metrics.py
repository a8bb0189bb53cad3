"""`GET /metrics`: the server's counters and gauges in Prometheus text format."""

from __future__ import annotations

from mer.api import peak_rss


def render_metrics(model, scheduler, http_errors: int) -> str:
    s, pool, c = scheduler.stats, scheduler.pool, model.cache.stats
    healthy = int(scheduler.health() is None)
    rows = [
        ("requests_total", "counter", "requests accepted", s.requests),
        ("requests_finished_total", "counter", "requests finished or cancelled", s.finished),
        ("requests_failed_total", "counter", "requests that ended in an error", s.failed),
        ("scheduler_healthy", "gauge", "1 while the engine runs and is not stuck", healthy),
        ("requests_running", "gauge", "sequences in the running batch", scheduler.n_running),
        ("requests_waiting", "gauge", "requests queued for admission", scheduler.n_waiting),
        ("http_errors_total", "counter", "requests answered with an error", http_errors),
        ("prompt_tokens_total", "counter", "prompt tokens of started requests", s.prompt_tokens),
        ("generation_tokens_total", "counter", "tokens generated", s.generated_tokens),
        ("steps_total", "counter", "batched forward passes", s.steps),
        (
            "engine_busy_seconds_total",
            "counter",
            "time the engine spent in steps",
            s.busy_seconds,
        ),  # fmt: skip
        ("batch_tokens_total", "counter", "tokens run in forward passes", s.batch_tokens),
        ("preemptions_total", "counter", "sequences preempted for KV room", s.preemptions),
        ("spec_rounds_total", "counter", "speculative verification passes", s.spec.rounds),
        ("spec_drafted_total", "counter", "tokens drafted", s.spec.drafted),
        ("spec_accepted_total", "counter", "drafted tokens accepted", s.spec.accepted),
        ("kv_blocks_total", "gauge", "KV blocks in the pool", pool.n_blocks),
        ("kv_blocks_used", "gauge", "KV blocks held by running sequences", pool.used_blocks),
        ("kv_blocks_cached", "gauge", "unheld KV blocks kept for prefix reuse", pool.cached_blocks),
        (
            "prefix_cache_hit_tokens_total",
            "counter",
            "prompt tokens reused",
            pool.prefix_hit_tokens,
        ),
        (
            "prefix_cache_query_tokens_total",
            "counter",
            "prompt tokens looked up",
            pool.prefix_query_tokens,
        ),  # fmt: skip
        ("expert_dedup_factor", "gauge", "sequences served per expert acquisition", s.dedup_factor),
        (
            "expert_demand_total",
            "counter",
            "experts wanted, per layer and sequence",
            s.expert_demand,
        ),  # fmt: skip
        (
            "expert_acquired_total",
            "counter",
            "experts acquired, per layer and step",
            s.expert_acquired,
        ),  # fmt: skip
        ("expert_cache_hits_total", "counter", "expert acquisitions found in RAM", c.hits),
        ("expert_cache_misses_total", "counter", "expert acquisitions read from SSD", c.misses),
        ("expert_cache_hit_ratio", "gauge", "hits over acquisitions", c.hit_rate),
        (
            "expert_reads_total",
            "counter",
            "expert reads started (demand and prefetch)",
            c.misses + c.prefetches - c.prefetches_cancelled,
        ),  # fmt: skip
        ("ssd_read_bytes_total", "counter", "expert bytes read from the SSD", c.bytes_read),
        (
            "io_stall_seconds_total",
            "counter",
            "time spent waiting on expert reads",
            c.stall_seconds,
        ),  # fmt: skip
        ("prefetches_total", "counter", "expert prefetches issued", c.prefetches),
        (
            "prefetches_used_total",
            "counter",
            "prefetched experts that were used",
            c.prefetches_used,
        ),  # fmt: skip
        ("peak_rss_bytes", "gauge", "high-water mark of the process's resident memory", peak_rss()),
        ("expert_cache_bytes", "gauge", "RAM of the expert cache's slots", model.budget_bytes),
    ]
    routing = model.transformer.routing  # None: exact routing, nothing changed
    r_sub, r_drop = (routing.stats.substituted, routing.stats.dropped) if routing else (0, 0)
    rows += [
        ("routing_substituted_total", "counter", "picks swapped for a resident expert", r_sub),
        ("routing_dropped_total", "counter", "non-resident picks left out", r_drop),
    ]
    if model.memory is not None:
        target = model.memory.target
        rows.append(("memory_target_bytes", "gauge", "the whole process's --memory", target))
    lines = []
    for name, kind, help_text, value in rows:
        lines += [
            f"# HELP mer_{name} {help_text}",
            f"# TYPE mer_{name} {kind}",
            f"mer_{name} {value}",
        ]
    return "\n".join(lines) + "\n"
