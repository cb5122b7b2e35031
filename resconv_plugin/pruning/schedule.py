"""The budget cap of budget-driven sparsity training: how far the selected gates may open at each step, and when the
capped set is ranked again."""

from __future__ import annotations

from typing import Optional

from resconv_plugin._checks import Interval, check_int, check_number

__all__ = ["CapSchedule"]


class CapSchedule:
    """Upper bound on the selected gates: 1 until ``cap_start``, then linear down to exactly 0 at ``zero_at``.

    Fractions are of ``steps`` (the number of ``regularize()`` calls planned for sparsity training). Before
    ``cap_start`` there is no cap (``None``); from ``zero_at`` on the cap is 0, so the selected gates are exactly 0 and
    their removal is exact.

    Args:
        steps: planned sparsity-training steps.
        zero_at: fraction of ``steps`` by which the cap reaches 0, in (0, 1].
        cap_start: fraction of ``steps`` before the cap starts to fall, in [0, zero_at).

    Example:
        >>> schedule = CapSchedule(100, zero_at=0.5, cap_start=0.1)
        >>> schedule.cap(5), schedule.cap(30), schedule.cap(50)
        (None, 0.5, 0.0)
    """

    def __init__(self, steps: int, zero_at: float = 0.75, cap_start: float = 0.0) -> None:
        check_int("sparsity_steps", steps, 1)
        check_number("zero_at", zero_at, Interval(0, 1, low_open=True))
        if isinstance(cap_start, bool) or not isinstance(cap_start, (int, float)) or not 0.0 <= cap_start < zero_at:
            raise ValueError(f"cap_start must be in [0, zero_at={zero_at}), got {cap_start!r}")
        self.steps, self.zero_at, self.cap_start = steps, float(zero_at), float(cap_start)

    def started(self, step: int) -> bool:
        """Whether the cap applies at ``step``."""
        return step / self.steps >= self.cap_start

    def cap(self, step: int) -> Optional[float]:
        """The cap after ``step`` steps (``None`` before ``cap_start``)."""
        progress = step / self.steps
        if progress < self.cap_start:
            return None
        return max(0.0, 1.0 - (progress - self.cap_start) / (self.zero_at - self.cap_start))

    def reranks(self, step: int, chosen_at: Optional[int], every: Optional[int]) -> bool:
        """Whether the capped set is chosen after step ``step`` (when the cap of ``step + 1`` applies): when none is
        chosen yet (``chosen_at`` None), then every ``every`` steps (None: never again) while that cap is above 0.

        Example:
            >>> schedule = CapSchedule(10, zero_at=0.5)
            >>> schedule.reranks(0, None, None), schedule.reranks(2, 0, 2), schedule.reranks(6, 0, 2)
            (True, True, False)
        """
        if chosen_at is None:
            return True
        cap = self.cap(step + 1)
        return every is not None and cap is not None and cap > 0.0 and step - chosen_at >= every
