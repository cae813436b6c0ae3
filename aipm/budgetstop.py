"""`run`: a budget lowered while attempts run applies to them too.

Each capped attempt (claude --max-budget-usd) was given a share of what the budget left when it started, so the
order's spent cost plus what its running attempts hold never passes the limit. A limit lowered since (order.yaml
edited mid-run) breaks that: the running attempts keep the caps of the old one and could together spend past the
new. The run says so once per limit, and once the new limit is reached (an attempt's cost recorded, or the limit
put at or below what is spent) it stops the order's capped attempts it owns, as a preemption does (QUEUED again,
attempt not counted): each counts what it reported, or its cap if it reported nothing (budget.py), and nothing
more is spent. Attempts owned by another run or by a detached `launch` are named, for `aipm cancel`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from aipm import budget
from aipm.model import Order
from aipm.record import Record
from aipm.spending import charged

if TYPE_CHECKING:
    from aipm.supervisor import Supervisor


def past_budget(sup: "Supervisor", order: Order, records: Iterable[Record], told: set[str]) -> list[dict]:
    """The events of a budget its running attempts (of the worker `records`) may pass (`budget` events, each said
    once: `told`), after stopping the attempts this run owns when it is reached."""
    records = [r for r in records if r.order == order.id and r.phase == "work" and r.cost_cap]
    if not records:
        return []  # the common case, read from the round's records alone: nothing capped runs
    spend = budget.of(charged(order, sup.rt), sup.settings.max_cost_usd, records)
    if spend is None or round(spend.limit - spend.spent - spend.unreported - spend.held, 6) >= 0:
        return []  # their caps fit in it: the budget holds them as it is
    if not spend.reached:
        detail = (f"max_cost_usd {budget.usd(spend.limit)} ({spend.source}) is below the order's cost "
                  f"({spend.cost}) plus what its running attempts may still spend ({budget.usd(spend.held)}: their "
                  "caps, given under the budget they started with): no attempt starts, and the running ones are "
                  "stopped once it is reached")
    else:
        others = [r.task for r in records if r.key not in sup.owned]
        stopped = [r.task for r in records if r.key in sup.owned
                   and sup.stop_attempt(r.key, f"max_cost_usd {budget.usd(spend.limit)} reached")]
        detail = (f"{spend.detail}; its running attempts could spend past it (their caps were given under a higher "
                  "budget)" + (f": stopped {', '.join(stopped)}, each counting what it spent (its cap if it did not "
                               "say)" if stopped else "")
                  + (f"; {', '.join(others)} run under another aipm: `aipm cancel` them" if others else ""))
    if detail in told:
        return []
    told.add(detail)
    return [{"event": "budget", "order": order.id, "detail": detail}]
