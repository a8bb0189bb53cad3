"""GGUF 4-bit blocks as mer int4 groups of 32: no float round trip.

A GGUF weight is quantized along its rows (the input dimension), as mer's
int4 groups are. Three block types map exactly onto int4 at group size 32,
where w = (q - 8) * scale + zero with q in 0..15:

| type | GGUF formula (per 32 weights) | scale | zero |
|---|---|---|---|
| Q4_0 | w = d * (q - 8) | d | 0 |
| Q4_1 | w = d * q + m | d | m + 8 d |
| Q4_K | w = d * sc_s * q - dmin * m_s (sub-block s of a 256-block) | d sc_s | 8 d sc_s - dmin m_s |

The nibbles are kept as they are; scale and zero are computed in float32 (exact:
fp16 times a 6-bit integer) and the only loss is the store's rounding of them
to bfloat16, the int4 kernel's scale dtype (unit roundoff 2^-8): as |q - 8| <= 8,
each weight is within 2^-8 * (8 |scale| + |zero|) of the GGUF value.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP = 32
EXACT_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] nibbles: low nibble of byte j is weight j, high is j + 16."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def decode(raw: np.ndarray, type_name: str, cols: int):
    """Block bytes uint8 [rows, row_bytes] -> (q uint8 [rows, cols], scales, zeros float32
    [rows, cols/32]) as torch tensors, for one of `EXACT_TYPES`."""
    rows = raw.shape[0]
    if type_name == "Q4_0":
        b = raw.reshape(rows, cols // 32, 18)
        d = _f16(b[..., :2]).reshape(rows, -1)
        q = _nibbles_32(b[..., 2:])
        scales, zeros = d, np.zeros_like(d)
    elif type_name == "Q4_1":
        b = raw.reshape(rows, cols // 32, 20)
        d = _f16(b[..., :2]).reshape(rows, -1)
        m = _f16(b[..., 2:4]).reshape(rows, -1)
        q = _nibbles_32(b[..., 4:])
        scales, zeros = d, m + 8 * d
    elif type_name == "Q4_K":
        b = raw.reshape(rows, cols // 256, 144)
        d = _f16(b[..., 0:2])  # [rows, nb, 1]
        dmin = _f16(b[..., 2:4])
        sc, mn = _scale_min_k4(b[..., 4:16])  # [rows, nb, 8] each
        qs = b[..., 16:].reshape(rows, -1, 4, 32)  # 4 chunks of 64 weights
        # chunk c: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, -1, 8, 32)
        scale = d * sc.astype(np.float32)
        zeros = (8 * scale - dmin * mn.astype(np.float32)).reshape(rows, -1)
        scales = scale.reshape(rows, -1)
    else:
        raise ValueError(f"{type_name} blocks do not map onto int4 groups")
    q = np.ascontiguousarray(q).reshape(rows, cols)
    return torch.from_numpy(q), torch.from_numpy(scales.copy()), torch.from_numpy(zeros.copy())


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K/Q5_K block -> 8 six-bit scales and 8 six-bit mins."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc, mn
