"""The read engine and the cache over it: one read per expert, cancellation, failures,
memory held to the budget, and reads that bypass the page cache."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import threading

import pytest

import mer
from mer.cache.expert_cache import ExpertCache
from mer.errors import ExpertReadError, StoreError
from mer.io.direct import DirectReader
from mer.io.engine import ReadEngine
from mer.store.reader import Store

PROMPT = [1, 17, 93, 5, 200, 41, 41, 7, 130, 66]


class GatedRead:
    """A reader that holds every read until the test opens the gate, counting reads."""

    def __init__(self, fail_nth: int | None = None, failures: int = 1):
        self.gate = threading.Event()
        self.entered = threading.Event()  # a read has started and waits at the gate
        self.count = 0
        self.fail_nth, self.failures = fail_nth, failures
        self.lock = threading.Lock()

    def __call__(self, reader, buf, offset):
        self.entered.set()
        self.gate.wait(10)
        with self.lock:
            self.count += 1
            n = self.count
        if self.fail_nth is not None and self.fail_nth <= n < self.fail_nth + self.failures:
            raise OSError(5, "Input/output error")
        reader.read_into(buf, offset)


def cache_with(store_path, slots, read=None, threads=2, retries=2):
    store = Store(store_path)
    engine = ReadEngine(DirectReader(store.expert_path), threads, retries=retries, read=read)
    return ExpertCache(store, slots * store.expert_format.nbytes, engine)


def test_concurrent_requests_for_one_expert_read_once(store_factory):
    gate = GatedRead()
    cache = cache_with(store_factory("int4"), slots=4, read=gate, threads=4)
    results = []

    def worker():
        with cache.use(1, 2) as w:
            results.append(w)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    gate.gate.set()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert gate.count == 1  # the extent fits one chunk: one read for eight requests
    assert cache.stats.misses == 1 and cache.stats.hits == 7


def test_cancelled_prefetch_never_writes_a_reused_slot(store_factory):
    gate = GatedRead()
    store = store_factory("int4")
    cache = cache_with(store, slots=2, read=gate, threads=1)
    # One thread, held at the gate: the first prefetch's read starts, the second waits.
    assert cache.prefetch(0, [0, 1]) == 2
    assert gate.entered.wait(10)
    assert cache.cancel_prefetches() == 1  # only the unstarted one
    slot_of_cancelled = [s for s in range(2) if s in cache._free][0]
    gate.gate.set()
    with cache.use(1, 3):  # takes the freed slot
        pass
    with cache.use(0, 0):
        pass
    # The slot now holds (1, 3) whole: the cancelled read of (0, 1) never landed in it.
    data = cache.pool.memory(slot_of_cancelled)[: cache.format.nbytes]
    Store(store).verify_expert(1, 3, data)
    assert cache.stats.prefetches_cancelled == 1 and gate.count == 2


def test_read_error_is_clear_and_the_cache_recovers(store_factory):
    bad = GatedRead(fail_nth=2, failures=3)  # more failures than retries
    bad.gate.set()
    cache = cache_with(store_factory("int4"), slots=4, read=bad, retries=2)
    with cache.use(0, 0):
        pass
    with pytest.raises(ExpertReadError) as e:
        cache.acquire(0, 1)
    msg = str(e.value)
    assert "layer 0, expert 1" in msg and "3 attempts" in msg and "\n" not in msg
    assert not cache.is_resident(0, 1) and len(cache._free) == 3
    with cache.use(0, 1):  # the next request works
        pass
    assert cache.engine.stats.retries == 2


def test_transient_error_is_retried(store_factory):
    flaky = GatedRead(fail_nth=1, failures=1)
    flaky.gate.set()
    cache = cache_with(store_factory("int4"), slots=4, read=flaky)
    with cache.use(1, 1):
        pass
    assert cache.engine.stats.retries == 1 and cache.stats.misses == 1


def test_corrupt_expert_read_by_a_prefetch_fails_its_acquirer(store_copy):
    store = store_copy()
    x = Store(store).extent(1, 0)
    with open(store / "experts.bin", "r+b") as f:
        f.seek(x.offset + 7)
        f.write(b"\x42")
    cache = cache_with(store, slots=4)
    cache.prefetch(1, [0])
    with pytest.raises(StoreError, match="layer 1, expert 0"):
        cache.acquire(1, 0)
    assert not cache.is_resident(1, 0)


@pytest.mark.parametrize("threads, prefetch", [(1, False), (4, False), (1, True), (4, True)])
def test_tokens_identical_with_overlap_and_threads(store_factory, threads, prefetch):
    store = store_factory("int4")
    slots = 5 * Store(store).expert_format.nbytes
    model = mer.open(store, ram_budget=slots, io_threads=threads, prefetch=prefetch)
    got = list(model.tokens(PROMPT, max_tokens=12, temperature=0.7, seed=2, stop_token_ids=[-1]))
    reference = mer.open(store, ram_budget="64MiB", io_threads=1, prefetch=False)
    want = list(reference.tokens(PROMPT, max_tokens=12, temperature=0.7, seed=2,
                                 stop_token_ids=[-1]))  # fmt: skip
    assert got == want
    if prefetch:
        assert model.stats().cache.prefetches > 0


def cached_pages(path) -> int:
    """Pages of `path` in the page cache, by mincore() over a mapping that touches nothing."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private: no writes back
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        if libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
            pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
        del anchor
    finally:
        mm.close()
    return sum(b & 1 for b in vec.raw)


def test_expert_reads_bypass_the_page_cache(store_factory):
    store = Store(store_factory("int4"))
    fd = os.open(store.expert_path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    before = cached_pages(store.expert_path)
    cache = cache_with(store.path, slots=8, threads=4)
    for key in store.extents:  # every expert, every byte of the file
        with cache.use(*key):
            pass
    assert cache.stats.bytes_read == os.path.getsize(store.expert_path)
    assert cache.reader.direct
    assert cached_pages(store.expert_path) <= before + 1


RSS_SCRIPT = """
import sys, mer
from mer.api import peak_rss
import torch
base = peak_rss()  # interpreter + torch + mer, before any model
m = mer.open(sys.argv[1], ram_budget=sys.argv[2], io_threads=4)
out = list(m.tokens([1, 5, 9, 11, 40, 41], max_tokens=int(sys.argv[3])))
s = m.stats()
dense = m.store.manifest["dense"]["nbytes"]
print(base, dense, s.cache.misses, s.cache.bytes_read, s.peak_rss_bytes)
"""


def test_peak_rss_stays_within_dense_plus_budget(tmp_path):
    """A model whose experts are many times the budget: RSS = dense + budget + overhead."""
    from mer.synth.checkpoint import hf_config
    from mer.synth.store import write_random_store

    hf = hf_config("small", num_hidden_layers=4, intermediate_size=1024)
    store = write_random_store(tmp_path / "s", hf, progress=False)
    s = Store(store)
    budget = 6 * s.expert_format.nbytes
    assert s.expert_bytes_total > 5 * budget
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(store), str(budget), "24"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    base, dense, misses, read, peak = map(int, proc.stdout.split())
    print(
        f"RSS MiB: base {base >> 20}, dense {dense >> 20}, budget {budget >> 20}, peak {peak >> 20}"
    )
    assert read > 2 * s.expert_bytes_total  # experts really were streamed, repeatedly
    overhead = 48 << 20  # KV cache, activations, reader threads' stacks, allocator slack
    assert peak <= base + dense + budget + overhead, (
        f"peak RSS {peak >> 20} MiB > base {base >> 20} + dense {dense >> 20} "
        f"+ budget {budget >> 20} + {overhead >> 20} MiB"
    )
