"""Fitting a whole process into one memory target: what is resident, what the cache gets.

A user knows "I have 8 GiB", not how much of it the expert cache may take. `plan`
splits a target into what the process already holds once its dense weights are
loaded (measured: resident set size now, of which the dense tensors as loaded are
counted apart), the KV cache it will allocate, a workspace for one forward pass's
activations (computed from the model's shapes and the most tokens one pass
carries), a margin for what grows after start and what the kernel charges a memory
cgroup beyond the resident set (page tables, page cache of the files read, allocator
arenas: `growth_margin`), and gives the rest to the expert cache. When the dense part plus the
smallest usable cache (one token's experts at one layer) does not fit, it raises
a one-line `BudgetError` naming the shortfall, before any expert is read.
It knows nothing about stores or files: callers pass what they measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mer.errors import BudgetError
from mer.models.layers import SMALL_ATTENTION
from mer.procfs import kib_field
from mer.units import fmt_bytes

BASE_WORKSPACE = 48 << 20  # allocator slack and small tensors of a pass, whatever its size
# Runs of the 32-layer Mixtral-shape store in cgroups equal to --memory peaked within ~30 MiB
# of the limit with no margin, and one (6 GiB, int4 dense weights, 4.9 GiB of experts) was
# OOM-killed: the group is charged more than the RSS measured at start.
MARGIN_SHARE, MIN_MARGIN = 0.02, 64 << 20


@dataclass(frozen=True)
class MemoryPlan:
    target: int
    dense: int  # the dense weights as loaded (resident)
    runtime: int  # the rest of the resident set at start: Python, PyTorch, libraries
    kv: int  # KV cache the run will allocate
    workspace: int  # activations of the largest forward pass
    min_cache: int  # one token's experts at one layer
    slot_bytes: int
    max_cache: int | None = None  # every expert of the model: more is never used
    margin: int = 0  # growth after start and what a cgroup charges beyond RSS

    @property
    def fixed(self) -> int:
        return self.dense + self.runtime + self.kv + self.workspace + self.margin

    @property
    def cache(self) -> int:
        """Bytes for the expert cache: whole slots of what the target leaves (at most all
        the experts)."""
        left = max(0, self.target - self.fixed)
        if self.max_cache is not None:
            left = min(left, self.max_cache)
        return left // self.slot_bytes * self.slot_bytes

    def line(self) -> str:
        return (
            f"memory {fmt_bytes(self.target)}: dense weights {fmt_bytes(self.dense)} + "
            f"runtime {fmt_bytes(self.runtime)} + KV cache {fmt_bytes(self.kv)} + "
            f"workspace {fmt_bytes(self.workspace)}"
            + (f" + margin {fmt_bytes(self.margin)}" if self.margin else "")
            + f" -> expert cache {fmt_bytes(self.cache)} "
            f"({self.cache // self.slot_bytes} experts of {fmt_bytes(self.slot_bytes)})"
        )


def plan(
    target: int,
    dense: int,
    resident: int,
    kv: int,
    workspace: int,
    slot_bytes: int,
    min_slots: int,
    max_slots: int | None = None,
    margin: int = 0,
) -> MemoryPlan:
    """The split of `target`; `resident` is the RSS measured with the dense weights loaded."""
    runtime, most = max(0, resident - dense), None if max_slots is None else max_slots * slot_bytes
    p = MemoryPlan(target, dense, runtime, kv, workspace, min_slots * slot_bytes, slot_bytes, most,
                   margin)  # fmt: skip
    need = p.fixed + p.min_cache
    if need > target:
        raise BudgetError(
            f"--memory {fmt_bytes(target)} is {fmt_bytes(need - target)} short: dense weights "
            f"{fmt_bytes(p.dense)} + runtime {fmt_bytes(p.runtime)} + KV cache {fmt_bytes(kv)} "
            f"+ workspace {fmt_bytes(workspace)}"
            + (f" + margin {fmt_bytes(margin)}" if margin else "")
            + " + the smallest expert cache "
            f"{fmt_bytes(p.min_cache)} (one token's {min_slots} experts at one layer) need "
            f"{fmt_bytes(need)}"
        )
    return p


def growth_margin(target: int) -> int:
    """What to keep free under `target` beyond what is measured and computed at start."""
    return max(MIN_MARGIN, int(MARGIN_SHARE * target))


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied head counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif hasattr(t, "tensors"):  # a quantized weight: its packed parts
            for part in t.tensors():
                s = part.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token takes in the KV cache of every layer (the family's layout)."""
    n = sum(math.prod(shape) for shape in config.family.kv_shapes(config))
    return n * dtype.itemsize * config.num_hidden_layers


def workspace_bytes(config, pass_tokens: int, context: int) -> int:
    """Activations of one forward pass of `pass_tokens` tokens against `context` cached
    positions, in float32 (the larger dtype): hidden states, q/k/v, one expert's
    intermediate per token, the logits of every token, the causal mask, and attention
    scores (float32, in query chunks of at most `SMALL_ATTENTION`: a few copies of it)."""
    h, t, s = config.hidden_size, pass_tokens, max(pass_tokens, context)
    f = max(config.intermediate_size, config.dense_intermediate_size)
    per_token = 4 * (8 * h + 4 * f + config.vocab_size)
    scores = 3 * 4 * min(config.num_attention_heads * t * s, SMALL_ATTENTION)
    return BASE_WORKSPACE + t * per_token + scores + t * s


def release_freed() -> None:
    """Hand memory freed to the C allocator back to the system (glibc `malloc_trim`), so
    that what loading left behind is not counted as in use; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss() -> int:
    """This process's resident memory now, in bytes (Linux VmRSS; 0 where unknown)."""
    return kib_field("/proc/self/status", "VmRSS") or 0
