"""A decode layer's small bfloat16 operations in one C call each (`rowops.c`): RMSNorm,
the rotary embedding, one query's attention (or a lone decode token's whole attention
from its projections on, or its layer's whole attention half: `mer.models.decode_layer`),
the router's top-k and greedy sampling's argmax.

A decode token's layer runs dozens of tiny PyTorch ops between its matrix products, and
each costs 30-50 us on caches the weights have just swept (2 us on warm ones): on the
Qwen3-30B-A3B shape that was several ms of a ~21 ms token. Each function here returns
None where it does not apply (another dtype or device, no AVX512 build, the probe failed), and the
caller runs its PyTorch formula instead. None of them makes a row's result depend on the
rows beside it, so a token gets the same bits alone or in a batch: the norm and the router
run every bfloat16 row through C whatever the batch, the rotary embedding is PyTorch's bits
exactly, and attention takes C for every one-query sequence, alone or batched. Shapes that
do not fit together return None too, so the formula raises PyTorch's own error.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import torch

from mer.quant import native

SOURCE = Path(__file__).with_name("rowops.c")
BF16 = torch.bfloat16
PARALLEL_WORK = 1 << 16  # multiply-adds below which one thread runs a call


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = native.build_avx512(SOURCE, "row kernels", "rowops_simd")
    if lib is None:
        return None
    i64, p, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.rms_norm_bf16.argtypes = [p, p, p, i64, i64, f32, i32]
    lib.rope_bf16.argtypes = [p, p, p, p, i64, i64, i64]
    lib.attend_one_bf16.argtypes = [p, p, p, p, p, f32, p, p, i64, i64, i64, i64, i64, i32]
    lib.route_bf16.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i32, i32]
    lib.attend_decode_bf16.argtypes = [p, p, p, p, p, f32, p, p, p, p, i64, p, p, f32, p, p, p,
                                       i64, i64, i64, i64, i32]  # fmt: skip
    fns = (lib.rms_norm_bf16, lib.rope_bf16, lib.attend_one_bf16, lib.route_bf16,
           lib.attend_decode_bf16)  # fmt: skip
    for f in fns:
        f.restype = None
    lib.argmax_f32.argtypes, lib.argmax_f32.restype = [p, i64], i64
    lib.decode_attention_bf16.argtypes = [p] * 7 + [i64, p, p, p, p, i32]
    lib.decode_attention_bf16.restype = None
    wrong = _disagreement(lib)
    if wrong:
        warnings.warn(f"row kernel {wrong} disagrees with PyTorch here: none used", stacklevel=3)
        return None
    return lib


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= PARALLEL_WORK else 1


def argmax(x: torch.Tensor) -> int | None:
    """torch.argmax of a float32 vector x [n] (the first of equals; a NaN's index, the first,
    where there is one), or None."""
    if x.dtype != torch.float32 or x.dim() != 1 or not (x.is_cpu and x.is_contiguous()):
        return None
    if not 0 < x.shape[0] < 1 << 31:
        return None
    lib = _lib()
    return None if lib is None else lib.argmax_f32(x.data_ptr(), x.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of bfloat16 rows x [..., n] by a bfloat16 weight [n], or None."""
    if x.dtype != BF16 or weight.dtype != BF16 or not (x.is_cpu and weight.is_cpu):
        return None
    if weight.dim() != 1 or x.numel() == 0 or x.shape[-1] != weight.shape[0]:
        return None
    lib = _lib()
    if lib is None:
        return None
    # contiguous copies bound to names: a temporary's memory would be freed before the call
    x, weight, n = x.contiguous(), weight.contiguous(), weight.shape[0]
    out = torch.empty_like(x)
    rows = x.numel() // n
    lib.rms_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n, eps,
                      _threads(x.numel()))  # fmt: skip
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """`apply_rotary` of bfloat16 x [T, heads, D] by tables [T, 1, D], bit for bit, or None."""
    tensors = (x, cos, sin)
    if any(t.dtype != BF16 or not (t.is_cpu and t.is_contiguous()) for t in tensors):
        return None
    if x.dim() != 3 or not cos.shape == sin.shape == (x.shape[0], 1, x.shape[2]):
        return None
    lib = _lib()
    if lib is None:
        return None
    out = torch.empty_like(x)
    lib.rope_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), *x.shape)
    return out


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """One query's GQA attention, q [1, Hq, D] over k [S, Hkv, D], v [S, Hkv, Dv] (bfloat16)
    with mask [1, S] -> [1, Hq * Dv]; or None."""
    t, hq, d = q.shape
    s, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    if any(x.dtype != BF16 or not x.is_cpu for x in (q, k, v)) or not mask.is_cpu:
        return None
    if t != 1 or k.shape[2] != d or v.shape[:2] != (s, hkv) or mask.shape != (1, s):
        return None
    if mask.dtype != torch.bool or (sinks is not None and sinks.shape != (hq,)):
        return None
    if d > 512 or dv > 512 or hq % hkv or hq // hkv > 64:
        return None
    lib = _lib()
    if lib is None or not (k.is_contiguous() and v.is_contiguous()):
        return None
    q, mask = q.contiguous(), mask.contiguous()
    sinks = None if sinks is None else sinks.float().contiguous()
    threads = _threads(hq * s * (d + dv))
    scores = torch.empty(hq, s)
    out = torch.empty(1, hq * dv, dtype=BF16)
    lib.attend_one_bf16(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(),
        None if sinks is None else sinks.data_ptr(), scale, scores.data_ptr(), out.data_ptr(),
        hq, hkv, s, d, dv, threads,
    )  # fmt: skip
    return out


def attend_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
    mask: torch.Tensor,
) -> torch.Tensor | None:
    """A lone decode token's attention from its projections q [1, Hq*D], k [1, Hkv*D],
    v [1, Hkv*Dv]: each head of q and k RMS-normed by q_norm, k_norm [D] (if given), both
    rotated by cos, sin [1, 1, D] (`Rotary.tables`), k and v written at row `pos` of a
    layer's cache k_cache [capacity, Hkv, D], v_cache [capacity, Hkv, Dv], and q attending
    to rows 0..pos under mask [1, pos + 1]: -> [1, Hq*Dv], the bits of `rms_norm`,
    `apply_rotary`, the cache's append and `attention` in turn, in one call. None (nothing
    written) where it does not apply."""
    if k_cache.dim() != 3 or v_cache.dim() != 3:
        return None
    cap, hkv, d = k_cache.shape
    dv = v_cache.shape[2]
    norms = [n for n in (q_norm, k_norm) if n is not None]
    tensors = (q, k, v, cos, sin, k_cache, v_cache, *norms)
    if any(t.dtype != BF16 or not (t.is_cpu and t.is_contiguous()) for t in tensors):
        return None
    if not (q.dim() == k.dim() == v.dim() == 2 and q.shape[0] == k.shape[0] == v.shape[0] == 1):
        return None
    hq = q.shape[1] // d if d else 0
    if d % 2 or d > 512 or dv > 512 or not hq or q.shape[1] != hq * d or hq % hkv:
        return None
    if hq // hkv > 64 or k.shape[1] != hkv * d or v.shape[1] != hkv * dv:
        return None
    if v_cache.shape[:2] != (cap, hkv) or not 0 <= pos < cap or cos.shape != sin.shape:
        return None
    if cos.numel() != d or any(n.shape != (d,) for n in norms):
        return None
    if mask.dtype != torch.bool or mask.shape != (1, pos + 1) or not mask.is_cpu:
        return None
    lib = _lib()
    if lib is None:
        return None
    mask = mask.contiguous()
    qr, scores = torch.empty(hq, d, dtype=BF16), torch.empty(hq, pos + 1)
    out = torch.empty(1, hq * dv, dtype=BF16)
    lib.attend_decode_bf16(
        q.data_ptr(), k.data_ptr(), v.data_ptr(),
        None if q_norm is None else q_norm.data_ptr(),
        None if k_norm is None else k_norm.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), pos, mask.data_ptr(), None, d**-0.5,
        qr.data_ptr(), scores.data_ptr(), out.data_ptr(), hq, hkv, d, dv,
        _threads(hq * (pos + 1) * (d + dv)),
    )  # fmt: skip
    return out


def route(
    x: torch.Tensor, gate: torch.Tensor, top_k: int, renormalise: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`layers.route` of bfloat16 rows x [T, H] by gate [E, H]: (weights [T, k] float32,
    ids [T, k]), or None."""
    if x.dtype != BF16 or gate.dtype != BF16 or not (x.is_cpu and gate.is_cpu):
        return None
    if x.dim() != 2 or gate.dim() != 2 or x.shape[1] != gate.shape[1]:
        return None
    if not 0 < top_k <= gate.shape[0] <= 4096:
        return None
    lib = _lib()
    if lib is None:
        return None
    (t, h), e = x.shape, gate.shape[0]
    x, gate, logits = x.contiguous(), gate.contiguous(), torch.empty(t, e)
    weights, ids = torch.empty(t, top_k), torch.empty(t, top_k, dtype=torch.int64)
    lib.route_bf16(x.data_ptr(), gate.data_ptr(), logits.data_ptr(),
                   weights.data_ptr(), ids.data_ptr(), t, e, h, top_k, renormalise,
                   _threads(t * e * h))  # fmt: skip
    return weights, ids


def _disagreement(lib: ctypes.CDLL) -> str | None:
    """The first built kernel that disagrees with PyTorch's formula on small random inputs.
    Outputs start as NaN (or -1), so a kernel that writes nothing never passes on what the
    allocator left there."""
    from mer.models import layers

    def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
        want = want.float()
        return bool((got.float() - want).abs().max() <= rel * want.abs().max())  # NaN: False

    nan = float("nan")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=gen).to(BF16)
    w = torch.randn(40, generator=gen).to(BF16)
    norm = torch.full_like(x, nan)
    lib.rms_norm_bf16(x.data_ptr(), w.data_ptr(), norm.data_ptr(), 15, 40, 1e-6, 1)
    if not close(norm, layers.rms_norm_torch(x, w, 1e-6), 2 * 2**-8):
        return "rms_norm_bf16"
    cos, sin = (torch.randn(3, 1, 40, generator=gen).to(BF16) for _ in range(2))
    out = torch.full_like(x, nan)
    lib.rope_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), 3, 5, 40)
    if not torch.equal(out, x * cos + x.roll(20, -1) * sin):
        return "rope_bf16"
    q = torch.randn(1, 6, 40, generator=gen).to(BF16)
    k, v = (torch.randn(37, 2, 40, generator=gen).to(BF16) for _ in range(2))
    mask = torch.rand(1, 37, generator=gen) > 0.3
    for sinks in (None, torch.randn(6, generator=gen)):
        scores, got = torch.empty(6, 37), torch.full((1, 240), nan, dtype=BF16)
        lib.attend_one_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(),
                            None if sinks is None else sinks.data_ptr(), 0.3, scores.data_ptr(),
                            got.data_ptr(), 6, 2, 37, 40, 40, 1)  # fmt: skip
        if not close(got, layers.attention_torch(q, k, v, mask, sinks, 0.3), 4 * 2**-8):
            return "attend_one_bf16"
    norms = [torch.randn(40, generator=gen).to(BF16) for _ in range(2)]
    qp, kp, vp = (torch.randn(1, n * 40, generator=gen).to(BF16) for n in (6, 2, 2))
    caches = [torch.randn(37, 2, 40, generator=gen).to(BF16) for _ in range(2)]
    cos, sin = cos[:1].contiguous(), sin[:1].contiguous()
    got, qr = torch.full((1, 240), nan, dtype=BF16), torch.empty(6, 40, dtype=BF16)
    lib.attend_decode_bf16(qp.data_ptr(), kp.data_ptr(), vp.data_ptr(), norms[0].data_ptr(),
                           norms[1].data_ptr(), 1e-6, cos.data_ptr(), sin.data_ptr(),
                           caches[0].data_ptr(), caches[1].data_ptr(), 36, mask.data_ptr(), None,
                           0.3, qr.data_ptr(), scores.data_ptr(), got.data_ptr(), 6, 2, 40, 40,
                           1)  # fmt: skip
    qh = layers.rms_norm_torch(qp.view(1, 6, 40), norms[0], 1e-6)
    kh = layers.rms_norm_torch(kp.view(1, 2, 40), norms[1], 1e-6)
    qh, kh = (z * cos + z.roll(20, -1) * sin for z in (qh, kh))
    if not torch.equal(caches[1][36], vp.view(2, 40)) or not close(caches[0][36], kh[0], 2**-7):
        return "attend_decode_bf16"
    if not close(got, layers.attention_torch(qh, *caches, mask, None, 0.3), 4 * 2**-8):
        return "attend_decode_bf16"
    gate = torch.randn(9, 40, generator=gen).to(BF16)
    x = x.view(15, 40)
    logits = torch.empty(15, 9)
    weights, ids = torch.full((15, 3), nan), torch.full((15, 3), -1, dtype=torch.int64)
    lib.route_bf16(x.data_ptr(), gate.data_ptr(), logits.data_ptr(), weights.data_ptr(),
                   ids.data_ptr(), 15, 9, 40, 3, True, 2)  # fmt: skip
    if not ((ids >= 0) & (ids < 9)).all():
        return "route_bf16"
    want_w, _ = layers.route_torch(x, gate, 3, True)
    probs = torch.softmax(torch.nn.functional.linear(x, gate).float(), -1).gather(1, ids)
    # ids may differ from topk's where two probabilities tie: compare what each chose
    if not (
        close(weights, want_w, 1e-2) and close(weights, probs / probs.sum(1, keepdim=True), 1e-2)
    ):
        return "route_bf16"
    v = torch.randn(37, generator=gen)
    if lib.argmax_f32(v.data_ptr(), 37) != int(torch.argmax(v)):
        return "argmax_f32"
    return None
