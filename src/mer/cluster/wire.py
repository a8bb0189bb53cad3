"""A layer call and its answer as they cross between head and workers: one `bytes` each.

Ray serialises a `bytes` argument inline with the call, while every numpy argument goes
through pickle with its own out-of-band buffer: measured on loopback, an actor call with
one 4 kB `bytes` each way took 0.6 ms round trip, the same data as three numpy arrays
and a tuple back 1.1-1.2 ms. So a call is one buffer: an int64 header, the pairs' int64
experts, counts and rows, their float32 router weights, then the token rows in the head's
dtype (bfloat16 as its bit pattern); an answer is an int64 header, the float64 seconds,
the resident experts, then the pairs' outputs.
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = (torch.bfloat16, torch.float32, torch.float16)  # by their code in a call's header
_NP = {torch.bfloat16: np.int16, torch.float32: np.float32, torch.float16: np.float16}


def _raw(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's memory as numpy (bfloat16 as int16), without a copy."""
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `dtype` over a copy of `a` (arrays over `bytes` are read-only)."""
    t = torch.from_numpy(a.copy())
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def pack_call(
    layer: int,
    single: bool,
    x: torch.Tensor,
    experts: np.ndarray,
    counts: np.ndarray,
    rows: np.ndarray,
    weights: np.ndarray,
) -> bytes:
    """One layer call: x [R, H] the distinct token rows; per pair (grouped by expert, the
    experts ascending, `counts` pairs each) its row in x and its float32 router weight."""
    r, h = x.shape
    head = np.array([layer, single, DTYPES.index(x.dtype), len(experts), len(rows), r, h], np.int64)
    ints = np.concatenate([head, experts, counts, rows]).astype(np.int64, copy=False)
    return b"".join((ints, weights.astype(np.float32, copy=False), _raw(x)))


def unpack_call(b: bytes):
    """(layer, single, dtype, experts, counts, rows [n] int64, weights [n] float32, x [R, H])
    from `pack_call`'s bytes."""
    layer, single, code, n_e, n, r, h = np.frombuffer(b, np.int64, 7).tolist()
    ints = np.frombuffer(b, np.int64, 2 * n_e + n, 56)
    experts, counts = ints[:n_e].tolist(), ints[n_e : 2 * n_e].tolist()
    rows = torch.from_numpy(ints[2 * n_e :].copy())
    at = 56 + 8 * (2 * n_e + n)
    weights = torch.from_numpy(np.frombuffer(b, np.float32, n, at).copy())
    dtype = DTYPES[code]
    x = _tensor(np.frombuffer(b, _NP[dtype], r * h, at + 4 * n).reshape(r, h), dtype)
    return layer, bool(single), dtype, experts, counts, rows, weights, x


def pack_answer(y: torch.Tensor, resident: list[int], seconds: float) -> bytes:
    """A worker's answer: the pairs' outputs y [n, H], its experts of the layer now in RAM,
    and the seconds the call took it."""
    head = np.array([len(resident), *y.shape], np.int64)
    return b"".join((head, np.array([seconds]), np.array(resident, np.int64), _raw(y)))


def unpack_answer(b: bytes, dtype: torch.dtype) -> tuple[torch.Tensor, list[int], float]:
    """(y [n, H] as `dtype`, resident experts, seconds) from `pack_answer`'s bytes."""
    n_res, n, h = np.frombuffer(b, np.int64, 3).tolist()
    seconds = float(np.frombuffer(b, np.float64, 1, 24)[0])
    resident = np.frombuffer(b, np.int64, n_res, 32).tolist()
    y = np.frombuffer(b, _NP[dtype], n * h, 32 + 8 * n_res).reshape(n, h)
    return _tensor(y, dtype), resident, seconds
