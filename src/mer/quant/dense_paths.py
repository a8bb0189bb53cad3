"""The kernel an int4 dense matrix runs on, chosen by measurement per shape and token class.

Two kernels compute y = x @ W.T from the same packed bytes: PyTorch's
`_weight_int4pack_mm_for_cpu` ("tinygemm") and mer's C kernel ("c",
`mer.quant.int4_paths.c_linear`, float32 accumulation, where it built as the AVX-512 path),
each on every compute thread or on one ("-1"). Why one thread: in a decode step a dense
matrix is used once between other work, so a parallel kernel starts with its worker
threads asleep, and on a busy machine waking one costs a scheduler time slice. Measured in
a decode of the 8-layer Mixtral-width store at 2.5 GiB on this project's 2-core machine
under a load of ~11: a 4096 x 4096 int4 matrix took 13.7 ms (C kernel) and 18.6 ms
(tinygemm) a call on 2 threads, 1.0 and 1.1 ms on one; int4 dense weights decoded slower
than bf16 ones (0.5 s of dense work per token against 0.45) until they ran on one thread
(0.08 s). Back-to-back calls keep the workers awake and hide this, so `measure` sleeps
before each timed call, as a decode step's other work would; even so a busy machine
fooled it, so one token takes only one-thread candidates. The first call of a shape and
token class (`int4_paths.CLASSES`) times the candidates, alternating, and keeps the
fastest for the process. `MER_DENSE_INT4_PATH` forces one of `PATHS`.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from mer.quant import int4, int4_paths

PATHS = ("tinygemm", "tinygemm-1", "c", "c-1")
ROUNDS = 4
ROUND_S = 0.01  # seconds of calls per candidate and round, at least
GAP_S = 0.002  # idle before each timed call: long enough for OpenMP workers to go to sleep

_chosen: dict[tuple, str] = {}


@contextmanager
def _one_thread():
    """PyTorch's kernels take the process-wide thread count; only the calling thread runs
    compute here (the reader threads do I/O), so it is set and restored around the call."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tinygemm(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return lin(x)


def tinygemm_1(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    with _one_thread():
        return lin(x)


def c(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return int4_paths.c_linear(lin, x).to(x.dtype)


def c_1(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return int4_paths.c_linear(lin, x, threads=1).to(x.dtype)


RUNNERS = {"tinygemm": tinygemm, "tinygemm-1": tinygemm_1, "c": c, "c-1": c_1}


def eligible(lin: int4.Int4Linear) -> list[str]:
    c_ok = (
        lin.n % 64 == 0
        and int4.kernel_layout() == "tinygemm-avx512"
        and int4_paths.native_available()
    )
    paths = ["tinygemm", "tinygemm-1", "c", "c-1"] if c_ok else ["tinygemm", "tinygemm-1"]
    return paths if torch.get_num_threads() > 1 else [p for p in paths if not p.endswith("-1")]


def matmul(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """x [T, k] @ W.T by the path chosen for this shape and T's class."""
    return RUNNERS[path_for(lin, x)](lin, x)


def path_for(lin: int4.Int4Linear, x: torch.Tensor) -> str:
    forced = os.environ.get("MER_DENSE_INT4_PATH")
    paths = eligible(lin)
    if forced:
        if forced not in PATHS:
            raise ValueError(f"MER_DENSE_INT4_PATH must be one of {', '.join(PATHS)}")
        return forced if forced in paths else forced.replace("c", "tinygemm")
    if len(paths) == 1:
        return paths[0]
    cls = int4_paths.shape_class(x.shape[0])
    if cls == "decode" and len(paths) > 2:
        # One token: one thread. Timed alone, a parallel kernel can still win on a busy
        # machine (it picked tinygemm for 1024 x 4096 at 10.7 ms a call in a decode where
        # the C kernel on one thread took 0.3 ms); in a decode step it never did.
        paths = [p for p in paths if p.endswith("-1")]
    key = (lin.n, lin.k, lin.group_size, cls, x.dtype, torch.get_num_threads())
    if key not in _chosen:
        ms = measure(lin, paths, int4_paths.CLASSES[cls], x.dtype)
        _chosen[key] = min(ms, key=ms.get)
    return _chosen[key]


def measure(lin: int4.Int4Linear, paths: list[str], tokens: int, dtype) -> dict[str, float]:
    """ms per call of each path on `tokens` tokens, each call after GAP_S idle: calls
    alternate between paths in rounds, and the score is the 20th percentile, which other
    processes inflate least."""
    x = torch.randn(tokens, lin.k, generator=torch.Generator().manual_seed(0)).to(dtype)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for p in paths:
        RUNNERS[p](lin, x)  # warm-up
    for _ in range(ROUNDS):
        for p in paths:
            start = time.perf_counter()
            while True:
                time.sleep(GAP_S)
                t0 = time.perf_counter()
                RUNNERS[p](lin, x)
                times[p].append(time.perf_counter() - t0)
                if time.perf_counter() - start >= ROUND_S:
                    break
    return {p: sorted(ts)[len(ts) // 5] * 1e3 for p, ts in times.items()}
