"""An order's budget: how much its attempts have cost (as recorded in the task files) against `max_cost_usd`.

Pure: the planner gets a Budget and stops starting attempts once it is spent; running attempts finish.
The limit is order.yaml's `max_cost_usd`, else the `max_cost_usd` setting; no limit, no Budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from aipm.model import Order


@dataclass(frozen=True)
class Budget:
    limit: float
    spent: float
    source: str  # where the limit comes from, for messages: "order.yaml" or "setting max_cost_usd"

    @property
    def reached(self) -> bool:
        return self.spent >= self.limit

    @property
    def detail(self) -> str:
        return (f"budget reached: the order's attempts cost {usd(self.spent)} of max_cost_usd "
                f"{usd(self.limit)} ({self.source}); raise it to go on")


def usd(amount: float) -> str:
    """Dollars for people: cents from $1 up, four decimals below (a short attempt costs fractions of a cent)."""
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


def spent(order: Order) -> float:
    """The order's recorded cost: the sum of its tasks' `cost_usd` (unknown costs count as nothing)."""
    return round(sum(t.cost_usd for t in order.tasks.values() if t.cost_usd is not None), 6)


def recorded(order: Order) -> float | None:
    """The order's cost for display: None when no task has a known cost (unknown is never 0)."""
    return spent(order) if any(t.cost_usd is not None for t in order.tasks.values()) else None


def of(order: Order, default_limit: float | None) -> Budget | None:
    if order.max_cost_usd is not None:
        return Budget(order.max_cost_usd, spent(order), "order.yaml")
    if default_limit is not None:
        return Budget(default_limit, spent(order), "setting max_cost_usd")
    return None
