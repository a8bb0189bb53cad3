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


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
