"""An order's budget: how much its attempts have cost (as recorded in the task files, and in the spending ledger
when a file says less: spending.charged) against `max_cost_usd`.

Pure: the planner gets a Budget and stops starting attempts once it is spent; running attempts finish.
The limit is order.yaml's `max_cost_usd`, else the `max_cost_usd` setting; no limit, no Budget.

Recorded costs arrive only when attempts end, so attempts started together could each spend the whole rest. An
attempt whose agent takes a cap (claude) is therefore given a share of what is left and holds it while it works
(its record's `cost_cap`): what is spent plus what running attempts hold never passes the limit, and no attempt
that may spend against it starts while nothing is left to share.

Claude reports its cost only in its final result: a capped attempt killed before it (a timeout, a cancel, its worker
lost) may have spent up to its cap, which aipm cannot see. Such an attempt's cap is recorded apart from the cost, in
its task's `cost_unreported_usd`, and counts against the budget as spent at most: never in `cost_usd` (no cost is
made up), never left out (the budget is not passed by what aipm cannot see). An attempt that exited by itself with
no event of claude's in its log never began a session and spent nothing (agents.settle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aipm import agents
from aipm.model import NO_BUDGET, Order, Task
from aipm.record import Record


# The least share an attempt is given while more could start: a budget split into shares too small to finish
# anything is all spent with nothing done (five claude attempts capped at $0.05 each all stopped at their cap), where
# fewer at once would have finished some. A claude attempt's first turns alone (its system prompt, the files it
# reads) cost cents.
MIN_SHARE = 0.10
HELD = "budget held"  # how a hold's detail begins: the task waits for the running attempts (no stop)


@dataclass(frozen=True)
class Budget:
    limit: float
    spent: float
    source: str  # where the limit comes from, for messages: "order.yaml" or "setting max_cost_usd"
    held: float = 0.0  # the caps of the order's running attempts: what they may still spend
    unreported: float = 0.0  # the caps of ended attempts that reported no cost: what they may have spent at most
    # Tasks whose attempts cost nothing against it (their own command; codex, the template): they need no share,
    # so what running attempts hold keeps none of them waiting. (A `sleep`'s lint waited for two agents to end.)
    costless: frozenset[str] = frozenset()
    # Tasks whose attempts spend with no cap to take (aider): their own budget cannot bound one, so each needs a
    # whole least share to start.
    uncapped: frozenset[str] = frozenset()

    @property
    def reached(self) -> bool:
        # What is left, in micro-dollars, as `available` has it: 0.7 spent and an unreported cap of 0.1 are
        # 0.7999999999999999, below a limit of 0.8 that nothing is left of; and a limit that is no whole number of
        # micro-dollars (0.8000004) leaves less than one, which `available` gives no attempt.
        return round(self.limit - self.spent - self.unreported, 6) <= 0

    @property
    def over(self) -> bool:
        return self.spent > self.limit

    @property
    def available(self) -> float:
        """What a new attempt may be given: the limit less what is spent and what running attempts hold."""
        return max(0.0, round(self.limit - self.spent - self.unreported - self.held, 6))

    def claim(self, task_id: str, own: float | None) -> float | None:
        """What a task that takes a share asks of split: what its own max_cost_usd leaves it (`own`: task_left), or
        None, a whole least share, for one whose agent takes no cap (its own budget cannot bound it)."""
        return None if task_id in self.uncapped else own

    def holds_back(self, task_id: str, own: float | None = None, before: Sequence[float | None] = ()) -> bool:
        """Whether the task waits because the running attempts, and those the plan starts before it (`before`:
        their claims), hold what is left, all of it or all but less than a least share (not a stop: see reached).
        `own`: what the task's own max_cost_usd leaves it (task_left)."""
        return task_id not in self.costless and not self.split([*before, self.claim(task_id, own)])[-1]

    def split(self, owns: list[float | None]) -> list[float]:
        """The caps of capped attempts that would start now, in the plan's order, each with what its own budget
        leaves it (None: no budget of its own): 0 for one that waits. What is available is shared equally, cut to
        whole micro-dollars so the caps never add up to more, and no cap is below MIN_SHARE, or the attempt's own
        budget where that is less (it needs no more): fewer start, and the others wait for them. Less only as the
        one cap of what is left while no running attempt holds any (all there is: it may be enough)."""
        left, least = round(self.available * 1_000_000), round(MIN_SHARE * 1_000_000)  # (whole micro-dollars)
        needs = [least if own is None else min(least, round(own * 1_000_000)) for own in owns]
        count, needed = 0, 0
        while count < len(needs) and needed + needs[count] <= left and left:
            needed += needs[count]
            count += 1
        if not count and needs and left and not self.held:
            count = 1  # all there is
        caps = [0] * len(owns)
        # Filled from the smallest own budget up: one that needs less than an equal part leaves the rest to others.
        funded = sorted(range(count), key=lambda i: float("inf") if owns[i] is None else owns[i])
        for n, i in enumerate(funded):
            part = left // (count - n)
            caps[i] = part if owns[i] is None else min(part, round(owns[i] * 1_000_000))
            left -= caps[i]
        return [cap / 1_000_000 for cap in caps]

    @property
    def cost(self) -> str:
        """What the order's attempts cost, as far as aipm can tell: "$X" or "$X spent, up to $Y more not reported
        by their attempts"."""
        return spent_text(self.spent, self.unreported)

    def held_detail(self, before: Sequence[str] = (), claims: Sequence[float | None] = ()) -> str:
        """Why a task is held back (holds_back): what the running attempts may still spend, and the shares of the
        tasks the plan chose before it (`before`, asking `claims`), named as such: they are not running (the load
        may defer them too), and "its running attempts may spend $0.3000 more" was said with none running."""
        # (said as no more than is left: the least share an aider attempt holds may be more than a budget has)
        left = max(0.0, round(self.limit - self.spent - self.unreported, 6))
        running = min(self.held, left)
        holders = [f"its running attempts may spend {usd(running)} more"] if running or not before else []
        if before:
            shares = min(round(sum(self.split(list(claims))), 6), round(left - running, 6))
            named = ", ".join(before[:3]) + (f" and {len(before) - 3} more" if len(before) > 3 else "")
            holders.append(f"{usd(shares)} is the shares of {named}, ranked before it, which start first")
        return (f"{HELD}: the order's attempts cost {self.cost} and {' and '.join(holders)}, of max_cost_usd "
                f"{usd(self.limit)} ({self.source}); waits for them to end")

    @property
    def over_detail(self) -> str:
        return (f"over budget: the order's attempts cost {self.cost}, more than max_cost_usd "
                f"{usd(self.limit)} ({self.source})")

    @property
    def detail(self) -> str:
        return (f"budget reached: the order's attempts cost {self.cost} of max_cost_usd "
                f"{usd(self.limit)} ({self.source}); raise it to go on")


def task_left(task: Task) -> float | None:
    """What a task's own `max_cost_usd` leaves for its next attempt: the limit less what its attempts cost and
    what killed ones may have spent; None without one. The contract's "no new attempt once reached" holds per task
    as per order: the cap of each attempt was the whole limit, so three attempts of a $0.10 task could spend $0.24."""
    if task.max_cost_usd is None:
        return None
    return max(0.0, round(task.max_cost_usd - (task.cost_usd or 0.0) - (task.cost_unreported_usd or 0.0), 6))


def task_reached(task: Task) -> bool:
    """Whether the task's own `max_cost_usd` leaves nothing for another attempt (False without one)."""
    return task.max_cost_usd is not None and not task_left(task)


def task_detail(task: Task) -> str:
    return (f"budget reached: the task's attempts cost {spent_text(task.cost_usd, task.cost_unreported_usd or 0.0)} "
            f"of its max_cost_usd {usd(task.max_cost_usd or 0.0)}; raise it to go on")


def usd(amount: float) -> str:
    """Dollars for people: cents from $1 up, four decimals below (a short attempt costs fractions of a cent)."""
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


def spent(order: Order) -> float:
    """The order's recorded cost: the sum of its tasks' `cost_usd` (unknown costs count as nothing), and what the
    spending ledger holds for tasks whose file is gone."""
    return round(sum(t.cost_usd for t in order.tasks.values() if t.cost_usd is not None) + order.gone_cost_usd[0], 6)


def unreported(order: Order) -> float:
    """The caps of the order's attempts that ended without reporting their cost: what they may have spent at most."""
    return round(sum(t.cost_unreported_usd for t in order.tasks.values() if t.cost_unreported_usd is not None)
                 + order.gone_cost_usd[1], 6)


def spent_text(known: float | None, more: float) -> str:
    """A cost for people: the known part, and the most that attempts which did not report their cost (killed before
    their report, or a report without it) may have spent: their caps."""
    if not more:
        return "unknown" if known is None else usd(known)
    if known is None:  # no attempt reported a cost
        return f"unknown: up to {usd(more)} not reported by their attempts"
    return f"{usd(known)} spent, up to {usd(more)} more not reported by their attempts"


def recorded(order: Order) -> float | None:
    """The order's cost for display: None when no task has a known cost (unknown is never 0)."""
    known = order.gone_cost_usd[0] or any(t.cost_usd is not None for t in order.tasks.values())
    return spent(order) if known else None


def held(order: Order, records: Iterable[Record]) -> float:
    """What the order's attempts still at work may spend: their caps (an ended attempt's cost is recorded), and a
    least share for each of an agent that spends with no cap to give it (aider): held as nothing, any number of
    them started at once under a budget that paid for one."""
    return round(sum(r.cost_cap if r.cost_cap is not None else MIN_SHARE if uncapped(r.agent) else 0.0
                     for r in records if r.order == order.id and r.phase == "work"), 6)


def uncapped(agent: str) -> bool:
    """The agent's attempts spend against a budget, but its CLI takes no cap (aider)."""
    # (a record's agent may be one this aipm does not know: a newer aipm's, or a worker's edit)
    return agent in agents.NAMES and agents.reports_cost(agent) and not agents.caps_cost(agent)


def attempt_caps(tasks: list[Task], spend: Budget | None, together: int, capped: Callable[[Task], bool],
                 spends: Callable[[Task], bool] = lambda task: False) -> dict[str, float | None]:
    """Each starting attempt's spending cap: the task's own `max_cost_usd`, and under an order budget no more than
    its share (Budget.split) of what is available, split among the `together` capped attempts the plan would start
    now (those starting on this reading among them). None for tasks whose agents take no cap (`capped` says which:
    their spending is known only once recorded); 0 for those that wait: beyond the attempts the budget can give a
    share (the first ones in the plan's order get one). An attempt that `spends` with no cap to take (aider) needs a
    share under an order budget as a capped one does, and starts with None (no cap) once it has one (held() counts
    it so while it runs)."""
    takers = [t for t in tasks if capped(t) or spend is not None and spends(t)]
    caps: dict[str, float | None] = {t.id: None for t in tasks}
    if spend is None:
        caps.update((t.id, task_left(t)) for t in takers)
        return caps
    # (what a task's own budget leaves does not bound an attempt that takes no cap: it needs a whole least share)
    owns = [task_left(t) if capped(t) else None for t in takers]
    # The plan would start `together` of them (this reading's starts among them): each is given its share as if
    # those it waits for started with it, so a ramp's one start does not take what the others will need.
    shares = spend.split(owns + [None] * max(0, together - len(takers)))
    caps.update((t.id, share if capped(t) or not share else None) for t, share in zip(takers, shares))
    return caps


def of(order: Order, default_limit: float | None, records: Iterable[Record] = ()) -> Budget | None:
    """The order's budget; `records` (the worker records) give what its running attempts hold."""
    limit, source = ((order.max_cost_usd, "order.yaml") if order.max_cost_usd is not None
                     else (default_limit, "setting max_cost_usd"))
    if limit is None or limit == NO_BUDGET:
        return None
    return Budget(limit, spent(order), source, held(order, records), unreported(order))
