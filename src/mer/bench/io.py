"""`mer bench io --store DIR`: expert reads against what the device gives, in one run.

1. The device: large O_DIRECT reads at a high queue depth over the store's own
   expert file (and `fio` on the same file, where installed).
2. The read engine: every expert in a random order at 1, 2, 4, 8... threads,
   as GB/s and as a ratio to the device figure measured in step 1.
3. Decoding: stall per token (time compute waited for reads) with prefetch off
   and on, at a RAM budget that holds a fraction of the experts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

from rich.console import Console
from rich.table import Table

from mer.io.direct import DirectReader, aligned_buffer
from mer.io.engine import ReadEngine
from mer.options import count, number, size
from mer.store.reader import Store

DEVICE_BLOCK = 8 << 20


def device_bandwidth(path, seconds: float, threads: int = 16, block: int = DEVICE_BLOCK) -> float:
    """Bytes/s of `threads` concurrent O_DIRECT reads of `block` bytes at random aligned offsets."""
    size = os.path.getsize(path)
    blocks = max(1, size // block)
    deadline = time.perf_counter() + seconds
    total = [0]
    lock = threading.Lock()

    def worker(seed: int) -> None:
        reader = DirectReader(path)
        _, buf = aligned_buffer(block)
        mem = memoryview(buf.numpy())
        rng = random.Random(seed)
        n = 0
        while time.perf_counter() < deadline:
            off = rng.randrange(blocks) * block
            length = min(block, size - off) // 4096 * 4096
            reader.read_into(mem[:length], off)
            n += length
        reader.close()
        with lock:
            total[0] += n

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return total[0] / (time.perf_counter() - t0)


def fio_bandwidth(path, seconds: float) -> float | None:
    """fio's figure for the same pattern, or None where fio is not installed."""
    if shutil.which("fio") is None:
        return None
    cmd = [
        "fio", "--name=mer", f"--filename={path}", "--readonly", "--direct=1", "--rw=randread",
        f"--bs={DEVICE_BLOCK}", "--ioengine=psync", "--numjobs=16", "--group_reporting",
        "--time_based", f"--runtime={max(1, int(seconds))}", "--output-format=json",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["jobs"][0]["read"]["bw_bytes"]


def engine_bandwidth(store: Store, threads: int, seconds: float) -> float:
    """Bytes/s of the read engine fetching experts in a random order into a few slots."""
    ef = store.expert_format
    slots = 2 * threads
    _, pool = aligned_buffer(slots * ef.nbytes)
    mem = memoryview(pool.numpy())
    keys = list(store.extents)
    random.Random(threads).shuffle(keys)
    engine = ReadEngine(DirectReader(store.expert_path), threads)
    t0 = time.perf_counter()
    inflight, i = [], 0
    while time.perf_counter() - t0 < seconds or i < slots:
        if len(inflight) == slots:
            inflight.pop(0).wait()
        x = store.extents[keys[i % len(keys)]]
        slot = i % slots
        buf = mem[slot * ef.nbytes : slot * ef.nbytes + x.length]
        inflight.append(engine.submit(buf, x.offset))
        i += 1
    for r in inflight:
        r.wait()
    elapsed = time.perf_counter() - t0
    engine.close()
    return engine.stats.bytes_read / elapsed


def decode_stall(store_path, budget: int, tokens: int, prefetch: bool, threads: int):
    import mer

    with mer.open(store_path, ram_budget=budget, io_threads=threads, prefetch=prefetch) as model:
        return _decode_run(model, tokens)


def _decode_run(model, tokens: int):
    stream = model.tokens([1, 330, 331, 332, 333], max_tokens=tokens + 1, stop_token_ids=[-1])
    next(stream)  # prefill: its reads are not decode stall
    after_prefill = model.cache.stats.stall_seconds
    for _ in stream:
        pass
    s = model.stats()
    return s.generation.decode_tps, 1e3 * (s.cache.stall_seconds - after_prefill) / tokens, s.cache


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", required=True)
    b.add_argument("--seconds", type=number(0, lo_open=True), default=3.0,
                   help="time per bandwidth measurement")  # fmt: skip
    b.add_argument("--threads", type=count, action="append", help="engine threads (repeatable)")
    b.add_argument("--ram-budget", type=size,
                   help="for the decode run (default: a third of the experts)")  # fmt: skip
    b.add_argument("--tokens", type=count, default=32, help="decode tokens per run")
    b.add_argument("--io-threads", type=count, default=4, help="reader threads for decoding")


def run(
    *,
    store: str,
    seconds: float,
    threads: list[int] | None,
    ram_budget: int | None,
    tokens: int,
    io_threads: int,
) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    store = Store(store)
    path = store.expert_path
    console.print(
        f"store {store.path}: {len(store.extents)} experts of {store.expert_format.nbytes >> 20} "
        f"MiB, {os.path.getsize(path) / 1e9:.2f} GB; {seconds:.0f} s per measurement"
    )
    device = device_bandwidth(path, seconds)
    t = Table(title="expert reads (O_DIRECT)")
    for col in ("reader", "GB/s", "vs device"):
        t.add_column(col, justify="right")
    t.add_row(f"device: 16 x {DEVICE_BLOCK >> 20} MiB random reads", f"{device / 1e9:.2f}", "1.00")
    fio = fio_bandwidth(path, seconds)
    t.add_row("fio, same pattern", f"{fio / 1e9:.2f}" if fio else "not installed",
              f"{fio / device:.2f}" if fio else "")  # fmt: skip
    for n in threads or [1, 2, 4, 8, 16]:
        bw = engine_bandwidth(store, n, seconds)
        t.add_row(f"engine, {n} threads, random experts", f"{bw / 1e9:.2f}",
                  f"{bw / device:.2f}")  # fmt: skip
    console.print(t)

    budget = ram_budget if ram_budget is not None else store.expert_bytes_total // 3
    d = Table(title=f"decode after prefill, {tokens} tokens, RAM budget {budget >> 20} MiB")
    for col in ("prefetch", "decode tok/s", "stall ms/token", "hit rate", "prefetches used"):
        d.add_column(col, justify="right")
    for prefetch in (False, True):
        tps, stall, c = decode_stall(store.path, budget, tokens, prefetch, io_threads)
        d.add_row("on" if prefetch else "off", f"{tps:.2f}", f"{stall:.1f}",
                  f"{100 * c.hit_rate:.1f}%", f"{c.prefetches_used}/{c.prefetches}")  # fmt: skip
    console.print(d)
