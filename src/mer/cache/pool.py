"""A fixed pool of equal expert slots, allocated once at start from the RAM budget.

One anonymous page-aligned mapping holds every slot, so O_DIRECT reads land
in place and no allocation happens on the hot path. The pool only hands out
memory; which expert lives in which slot is the cache's business.
"""

from __future__ import annotations

import torch

from mer.errors import BudgetError
from mer.io.direct import ALIGN, aligned_buffer
from mer.units import fmt_bytes


class SlotPool:
    def __init__(
        self, slot_bytes: int, budget_bytes: int, min_slots: int, max_slots: int, what: str
    ) -> None:
        if slot_bytes % ALIGN:
            raise ValueError(f"slot size {slot_bytes} is not a multiple of {ALIGN}")
        self.slot_bytes = slot_bytes
        self.n_slots = min(budget_bytes // slot_bytes, max_slots)
        if self.n_slots < min_slots:
            raise BudgetError(
                f"RAM budget {fmt_bytes(budget_bytes)} holds {self.n_slots} experts of "
                f"{fmt_bytes(slot_bytes)}; {what} needs at least {min_slots} "
                f"({fmt_bytes(min_slots * slot_bytes)})"
            )
        self._mm, self._buf = aligned_buffer(self.n_slots * slot_bytes)
        self._view = memoryview(self._mm)

    def tensor(self, slot: int) -> torch.Tensor:
        """The slot's bytes as a uint8 tensor (shared memory, no copy)."""
        a = slot * self.slot_bytes
        return self._buf[a : a + self.slot_bytes]

    def memory(self, slot: int) -> memoryview:
        """The slot's bytes as a writable memoryview, for the reader."""
        a = slot * self.slot_bytes
        return self._view[a : a + self.slot_bytes]
