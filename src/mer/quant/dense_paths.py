"""The kernel an int4 dense matrix runs on, chosen by measurement per shape and token class.

Three kernels compute y = x @ W.T from the same packed bytes: PyTorch's
`_weight_int4pack_mm_for_cpu` ("tinygemm"), mer's C kernel in float32 ("c",
`mer.quant.int4_paths.c_linear`) and the same on activations rounded per group to int8
with VNNI dot products ("c-int8", `int4_paths.c_linear_i8`, as llama.cpp runs Q4_0 x
Q8_0), each on every compute thread or on one ("-1"). The C kernels run where they built
as the AVX-512 path (and c-int8 where VNNI passed its probe); c-int8 rounds activations,
so it is never taken for float32 activations (exact runs).

Why the thread count is measured, and how. A parallel kernel's worker threads sleep
between calls; on a busy machine waking one costs a scheduler time slice (measured in a
decode of the 8-layer Mixtral-width store under a load of ~11: 4096 x 4096 took 13.7 ms a
call on 2 threads, 1.0 ms on one), while on a quiet machine one thread halves the rate. A
matrix timed alone, back to back, keeps its workers awake and favours every thread
whatever the load; a decode step runs a layer's matrices back to back and then the
layer's other work. So the decode class is measured as a decode step uses the matrices:
`prepare` (called as a model opens, with its dense weights) runs the model's own int4
matrices of its first layers and its head in order, one token each, with GAP_S idle
between layers for the rest of the layer's work; each candidate runs whole passes,
candidates alternate pass by pass, every call is timed where it stands in its pass, and
each shape takes the candidate with the lowest median of its per-pass time (c-int8 where it
is within FUSED_SAVES_MS a call of that: see `_pick_decode`). A shape not
prepared so (a matrix used outside a model) is measured the same way on its own, each
call after GAP_S idle. The small and prefill classes (`int4_paths.CLASSES`) are measured
per shape, calls alternating after GAP_S idle, by `prepare` too, or on a shape's first
call. Choices are kept for the
process, not on disk (the decode choice depends on how busy the machine is): measuring the
8-layer Mixtral-width model's three shapes took 1.1 s for decode and ~8 s in all, most of
it the output head at 64 tokens, on the 2-core machine under a load of ~2.

Float32 activations take one kernel for every class (the C kernel where it runs, else
tinygemm), only its thread count measured: the C kernel sums each token's row in the same
order at any token or thread count, so a prefix recomputed as a prefill gives the tokens
it gave decoded one by one. For bf16 activations too a shape's classes all take one
kernel, the decode choice's (`_same_family`; `int4_paths` keeps one path per shape for
experts): kernels round differently, and a token's output must not depend on how many
tokens share its pass (a request alone and batched must sample the same text).
`MER_DENSE_INT4_PATH` forces one of `PATHS`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from mer.quant import int4, int4_paths

PATHS = ("tinygemm", "tinygemm-1", "c", "c-1", "c-int8", "c-int8-1")
ROUNDS = 4
ROUND_S = 0.01  # seconds of calls per candidate and round, at least
GAP_S = 0.002  # idle before a layer (or a lone call): long enough for workers to go to sleep
PASS_ROUNDS = 7  # decode passes per candidate in `prepare`
PASS_LAYERS = 4  # layers of the model a decode pass runs (and every matrix outside layers)
# What a decode layer's one C call saves a call of its q/k/v or o matrix, at least: the Python
# path of the attention half cost 0.86 ms a token more on the Qwen3-30B-A3B shape (6 layers,
# two such calls each: ~70 us a call; median of 12 alternated rounds, c-int8 in both)
FUSED_SAVES_MS = 0.05

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


def c_int8(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return int4_paths.c_linear_i8(lin, x).to(x.dtype)


def c_int8_1(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return int4_paths.c_linear_i8(lin, x, threads=1).to(x.dtype)


RUNNERS = {
    "tinygemm": tinygemm,
    "tinygemm-1": tinygemm_1,
    "c": c,
    "c-1": c_1,
    "c-int8": c_int8,
    "c-int8-1": c_int8_1,
}


def available(lin: int4.Int4Linear) -> list[str]:
    """The paths that can compute `lin` here (a forced path runs where it is among them)."""
    c_ok = (
        lin.n % 64 == 0
        and int4.kernel_layout() == "tinygemm-avx512"
        and int4_paths.native_available(lin.symmetric)
    )
    i8_ok = c_ok and int4_paths.int8_available(lin.symmetric)
    return [p for p in PATHS if not p.startswith("c") or (i8_ok if "int8" in p else c_ok)]


def eligible(lin: int4.Int4Linear, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The candidates the choice measures for `lin` on activations of `dtype`."""
    paths = available(lin)
    if dtype != torch.bfloat16:  # exact runs: one kernel for every class (module docstring)
        kernel = "c" if "c" in paths else "tinygemm"
        paths = [kernel, f"{kernel}-1"]
    return paths if torch.get_num_threads() > 1 else [p for p in paths if not p.endswith("-1")]


def matmul(lin: int4.Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """x [T, k] @ W.T by the path chosen for this shape and T's class."""
    return RUNNERS[path_for(lin, x)](lin, x)


def _key(lin: int4.Int4Linear, cls: str, dtype: torch.dtype) -> tuple:
    return (lin.n, lin.k, lin.group_size, lin.symmetric, cls, dtype, torch.get_num_threads())


def _kernel(path: str) -> str:
    return path.removesuffix("-1")


def _same_family(lin: int4.Int4Linear, cls: str, dtype: torch.dtype, paths: list[str]):
    """`paths` less those of another kernel than the one already chosen for another class
    of the shape (the first class chosen, decode as a model opens, sets it): kernels round
    differently, and a token's output must not depend on how many tokens share its pass.
    The thread count stays free: each kernel sums a row in the same order on any."""
    for other in int4_paths.CLASSES:
        chosen = _chosen.get(_key(lin, other, dtype))
        if other != cls and chosen is not None:
            return [p for p in paths if _kernel(p) == _kernel(chosen)] or paths
    return paths


def path_for(lin: int4.Int4Linear, x: torch.Tensor) -> str:
    forced = os.environ.get("MER_DENSE_INT4_PATH")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"MER_DENSE_INT4_PATH must be one of {', '.join(PATHS)}")
        if forced in available(lin):
            return forced
        return "tinygemm-1" if forced.endswith("-1") else "tinygemm"
    cls = int4_paths.shape_class(x.shape[0])
    key = _key(lin, cls, x.dtype)
    if key not in _chosen:  # every call asks: the candidates are worked out only the first time
        paths = _same_family(lin, cls, x.dtype, eligible(lin, x.dtype))
        if len(paths) == 1:
            _chosen[key] = paths[0]
        elif cls == "decode":
            _chosen.update(measure_decode([[lin]], x.dtype))
        else:
            ms = measure(lin, paths, int4_paths.CLASSES[cls], x.dtype)
            _chosen[key] = min(ms, key=ms.get)
    return _chosen[key]


def measure(lin: int4.Int4Linear, paths: list[str], tokens: int, dtype) -> dict[str, float]:
    """ms per call of each path on `tokens` tokens, each call after GAP_S idle: calls
    alternate between paths in rounds, and the score is the 20th percentile, which other
    processes inflate least. Paths whose fastest call of the first round is 3x behind the
    best one's are not timed further (they would not win, and timing them is most of the
    cost): their score is from that round alone."""
    x = torch.randn(tokens, lin.k, generator=torch.Generator().manual_seed(0)).to(dtype)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for p in paths:
        RUNNERS[p](lin, x)  # warm-up
    for r in range(ROUNDS):
        timing = list(times)
        if r >= 1:
            best = min(min(ts) for ts in times.values())
            timing = [p for p, ts in times.items() if min(ts) <= 3 * best]
        for p in timing:
            start = time.perf_counter()
            while True:
                time.sleep(GAP_S)
                t0 = time.perf_counter()
                RUNNERS[p](lin, x)
                times[p].append(time.perf_counter() - t0)
                if time.perf_counter() - start >= ROUND_S:
                    break
    return {p: sorted(ts)[len(ts) // 5] * 1e3 for p, ts in times.items()}


def measure_decode(
    layers: list[list[int4.Int4Linear]], dtype: torch.dtype, rounds: int = PASS_ROUNDS
) -> dict[tuple, str]:
    """The decode path per shape among `layers` (each a layer's matrices in call order), by
    passes as a decode step makes them (module docstring): {`_key`: path}. Candidates are
    those every matrix of a shape can take."""
    shapes: dict[tuple, list[str]] = {}
    for lin in (m for layer in layers for m in layer):
        key = _key(lin, "decode", dtype)
        ok = _same_family(lin, "decode", dtype, eligible(lin, dtype))
        shapes[key] = [p for p in shapes.get(key, ok) if p in ok]
    cands = sorted({p for ps in shapes.values() for p in ps}, key=PATHS.index)
    xs = {k: torch.randn(1, k, generator=torch.Generator().manual_seed(0)).to(dtype)
          for k in {m.k for layer in layers for m in layer}}  # fmt: skip
    # ms per pass spent on each shape's calls: totals[path][key] = [one figure a pass]
    totals: dict[str, dict[tuple, list[float]]] = {p: {k: [] for k in shapes} for p in cands}

    def one_pass(path: str) -> dict[tuple, float]:
        spent = dict.fromkeys(shapes, 0.0)
        for layer in layers:
            time.sleep(GAP_S)  # the rest of the layer's work: attention, experts
            for lin in layer:
                key = _key(lin, "decode", dtype)
                run = path if path in shapes[key] else shapes[key][0]
                t0 = time.perf_counter()
                RUNNERS[run](lin, xs[lin.k])
                spent[key] += time.perf_counter() - t0
        return spent

    for p in cands:
        one_pass(p)  # warm-up: first calls allocate, first C calls build
    for _ in range(rounds):
        for p in cands:
            for key, s in one_pass(p).items():
                totals[p][key].append(s * 1e3)
    calls = {key: sum(_key(m, "decode", dtype) == key for layer in layers for m in layer)
             for key in shapes}  # fmt: skip
    return {key: _pick_decode(totals, key, ps, calls[key]) for key, ps in shapes.items()}


def _pick_decode(totals: dict, key: tuple, paths: list[str], calls: int) -> str:
    """The path of lowest median ms a pass, but the int8-activation kernel wherever it is
    within FUSED_SAVES_MS a call of it: a decode layer whose q/k/v and o take that kernel
    runs its attention half in one C call (`mer.models.decode_layer`), which saves more
    than that, and equally fast kernels otherwise won by chance, process by process."""
    med = {p: statistics.median(totals[p][key]) for p in paths}
    best = min(paths, key=med.get)
    fused = [p for p in paths if _kernel(p) == "c-int8"]
    if fused:
        p = min(fused, key=med.get)
        if med[p] <= med[best] + FUSED_SAVES_MS * calls:
            return p
    return best


def prepare(names_and_weights: Iterable[tuple[str, object]], dtype: torch.dtype) -> None:
    """Choose the path of every int4 dense shape of a model now, so no step of it measures:
    decode by passes over its own matrices (`measure_decode`), those of its first
    PASS_LAYERS layers and every one outside layers (the output head) in the model's order;
    small batches and prefill per shape (`measure`). `names_and_weights`: the model's dense
    weights by name (`layers.{i}.` prefixes name a layer's; a shape that only later layers
    have is measured on its first call)."""
    if os.environ.get("MER_DENSE_INT4_PATH"):
        return
    layers: dict[str, list[int4.Int4Linear]] = {}
    for name, w in names_and_weights:
        lin = getattr(w, "linear", None)
        if not isinstance(lin, int4.Int4Linear):
            continue
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "layers" else name
        if parts[0] == "layers" and int(parts[1]) >= PASS_LAYERS:
            continue
        layers.setdefault(group, []).append(lin)
    todo = [
        layer
        for layer in layers.values()
        if any(len(eligible(m, dtype)) > 1 and _key(m, "decode", dtype) not in _chosen
               for m in layer)
    ]  # fmt: skip
    if todo:
        _chosen.update(measure_decode(todo, dtype))
    for lin in {_key(m, "", dtype): m for layer in layers.values() for m in layer}.values():
        for cls, tokens in int4_paths.CLASSES.items():
            paths = _same_family(lin, cls, dtype, eligible(lin, dtype))
            if cls != "decode" and _key(lin, cls, dtype) not in _chosen and len(paths) > 1:
                ms = measure(lin, paths, tokens, dtype)
                _chosen[_key(lin, cls, dtype)] = min(ms, key=ms.get)
