"""Tensors as they cross between head and workers: numpy arrays, which Ray serialises
without pickling their bytes (pickle protocol 5 out-of-band buffers; small ones inline
in the call). bfloat16 has no numpy dtype: it travels as its int16 bit pattern."""

from __future__ import annotations

import numpy as np
import torch


def to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor `to_wire` sent, as `dtype` (the sender's). Arrays Ray hands out of its
    object store are read-only: those are copied, as torch needs writable memory."""
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


DTYPES = (torch.bfloat16, torch.float32, torch.float16)  # by their code in a call's meta


def pack_meta(layer: int, single: bool, dtype: torch.dtype, experts, counts, rows) -> np.ndarray:
    """One int64 array of what a layer call says besides its arrays of numbers:
    [layer, single, dtype code, number of experts, experts..., counts..., rows...]."""
    head = np.array([layer, single, DTYPES.index(dtype), len(experts)], np.int64)
    return np.concatenate([head, experts, counts, rows]).astype(np.int64, copy=False)


def unpack_meta(meta: np.ndarray):
    """(layer, single, dtype, experts, counts, rows) from `pack_meta`'s array."""
    layer, single, code, n = meta[:4].tolist()
    experts, counts = meta[4 : 4 + n].tolist(), meta[4 + n : 4 + 2 * n].tolist()
    return layer, bool(single), DTYPES[code], experts, counts, meta[4 + 2 * n :]
