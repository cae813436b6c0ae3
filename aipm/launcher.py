"""The launch transaction: recover, plan and start, as one step under the project's launch lock.

Every status write happens under that lock, so a plan and the writes that act on it are one step that no other
aipm process can interleave with. The plan's inputs (what running tasks hold, the live workers, how many more
may start now) are read here; each task's start and its undoing are starting.py's.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

from aipm import agents, durable, holds, locks, recovery, scope, subreaper
from aipm.budget import Budget, attempt_caps, of as order_budget, uncapped
from aipm.model import RUNNING, Order, Status, Task
from aipm.paths import normalize
from aipm.plan import LIMIT, Busy, ForeignLock, Plan, plan
from aipm.project import Project
from aipm.capacity import Refusals, fit
from aipm.demand import Demands
from aipm.resources import RAMP_DELAY, RAMP_FROM_PERCENT, ResourceMonitor, machine_capacity, starts_now
from aipm.record import Record, live_pid
from aipm.runtime import Runtime
from aipm.settings import Settings
from aipm.slots import borrowed
from aipm.spending import charged
from aipm.starting import LaunchBusy, LaunchFailed, Owner, Starter, Starting
from aipm.view import OrderView
from aipm.worker import agent_for


@dataclass
class Options:
    """Per-invocation choices (flags) on top of the settings."""

    no_review: bool = False
    model: str | None = None
    dry_run: bool = False


@dataclass
class LaunchReport:
    launched: list[dict] = field(default_factory=list)
    deferred: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    recovered: list[dict] = field(default_factory=list)
    plan: Plan | None = None
    order: Order | None = None
    records: list[Record] = field(default_factory=list)  # as read before this launch


class Launcher(Starter):
    """Starts tasks of one project; shared by `launch`, `exec`, `run` and detached workers."""

    def __init__(self, project: Project, settings: Settings, options: Options | None = None,
                 monitor: ResourceMonitor | None = None):
        self.project = project
        self.settings = settings
        self.options = options or Options()
        self.runtime = Runtime(project.root)
        self.holdings = locks.Holdings(self.runtime.state)
        self.monitor = monitor
        self.detached: set[int] = set()  # owners we started (`aipm.work`): never mistaken for strays
        self._unrecorded: tuple[frozenset, float, set] | None = None  # see _running_unrecorded
        self.demands = Demands(self.runtime.state)  # priority across orders (demand.py)
        self._ramped_at: float | None = None  # when the last start on a ramp was made (clock: _now)
        self._ramping = False  # whether start_budget's last answer was a ramp's one start
        if monitor is None and settings.enable_monitoring:
            self.monitor = ResourceMonitor(settings.max_cpu_percent, settings.max_memory_percent)

    # -- planning inputs -------------------------------------------------------------------------------

    def holders(self, order: Order, records: Iterable[Record], ending: Collection[str] = (),
                released: Collection[str] = (), running: Collection[str] | None = None,
                ) -> tuple[list[Busy], dict[str, int], int]:
        """Busy files from worker records and other orders' running tasks, this order's live task ids (→ pid),
        and the live worker count. `released`: keys of ended workers whose files are free already (see runloop);
        `running`: this order's IN_PROGRESS and IN_REVIEW task ids, when the caller's view knows them.

        A dead record (a stale task) still holds its files until recovered, but takes no worker slot; so does a
        task of another order marked IN_PROGRESS or IN_REVIEW by hand, with no record at all. A live one counts
        whatever its task's file says now, and so does a running task whose worker lives on without its record
        (a worker removed the state directory, and its owner died): its pid unknown (0).
        """
        busy, live, count = [], {}, 0
        for rec in records:
            alive = rec.alive()
            if rec.key not in released:  # a released one still counts as live below: its file may have been reset
                status = Status.IN_PROGRESS if rec.phase == "work" else Status.IN_REVIEW
                busy.append(Busy(rec.order, rec.task, tuple(normalize(t) for t in rec.targets), status.value,
                                 gone=not alive))
            if alive:
                count += rec.key not in ending  # a worker that ended: its files wait for its outcome, not a slot
                if rec.order == order.id:
                    live[rec.task] = live_pid(rec)
        recorded = {(rec.order, rec.task) for rec in records}
        elsewhere = [b for b in holds.held_elsewhere(self.project.root, self.project.order_dirs(), order.path,
                                                     save=not self.options.dry_run)
                     if (b.order_id, b.task_id) not in recorded]
        ids = running if running is not None else [t.id for t in order.tasks.values() if t.status in RUNNING]
        unrecorded = {(order.id, tid) for tid in ids if (order.id, tid) not in recorded}
        running_on = self._running_unrecorded(unrecorded | {(b.order_id, b.task_id) for b in elsewhere})
        # Another order's task marked running with no record and no worker: nothing will ever free its files.
        busy += [replace(b, gone=True) if (b.order_id, b.task_id) not in running_on else b for b in elsewhere]
        for order_id, task_id in running_on:
            count += 1
            if order_id == order.id:
                live[task_id] = 0
        return busy, live, count

    def _running_unrecorded(self, tasks: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of running tasks without a record, those whose worker lives on (subreaper.tasks_running): one look at
        every process, at most once a second for the same tasks (such a worker only ever ends, so a stale answer
        errs on the side of one slot too few). Nothing to look at in the usual case: every worker has a record."""
        if not tasks:
            return set()
        now = time.monotonic()
        if self._unrecorded is not None and self._unrecorded[0] == tasks and now - self._unrecorded[1] < 1.0:
            return self._unrecorded[2]
        alive = subreaper.tasks_running(self.project.root, tasks)
        self._unrecorded = (frozenset(tasks), now, alive)
        return alive

    def outside(self, records: Iterable[Record]) -> list[ForeignLock]:
        """Target locks held by processes no record accounts for: a daemon a finished worker left, another tool.
        They keep their files busy like a running task until they are released."""
        nodes = locks.lock_nodes(normalize(t) for rec in records for t in rec.targets)
        explained = {locks.node_file(n) if n else "" for n in nodes}
        return [ForeignLock(pids, held) for pids, held in self.holdings.outside(explained)]

    def records(self) -> list[Record]:
        """Worker records, without the leftovers of owners killed after their task's final write.

        Such a record is dead and its task has moved on (or is gone): it holds nothing, so it is dropped (a dry
        run only ignores it: it writes nothing).
        """
        kept = []
        for rec in self.runtime.records():
            if not recovery.left_behind(rec, self.runtime):
                kept.append(rec)
            elif not self.options.dry_run:
                recovery.forget(self.runtime, rec)
        return kept

    def start_budget(self, live_workers: int) -> tuple[int, str, str]:
        """How many workers may start now, and why any more would wait: (count, reason code, detail).

        max_workers less the live ones, scaled down under load; one at a time on a machine already half busy
        (ramp-up: the next start waits for a reading that shows what this one does).
        """
        free = max(0, self.settings.max_workers - live_workers)
        if self.monitor is None or not self.settings.enable_auto_scaling:
            return free, "resources", "resource limit"
        status = self.monitor.get_status(wait=False)  # never blocks the run's loop; ramp-up re-reads
        detail = f"cpu {status.cpu_percent:.0f}%, memory {status.memory_percent:.0f}%"
        allowed = max(0, self.monitor.recommended(status, self.settings.max_workers) - live_workers)
        load = max(status.cpu_percent, status.memory_percent)
        ramped = starts_now(load, allowed)
        self._ramping = bool(ramped) and load >= RAMP_FROM_PERCENT and not self.options.dry_run
        if self._ramping and self._ramped_at is not None and _now() - self._ramped_at < RAMP_DELAY:
            # One start per RAMP_DELAY, however often the caller plans: `run` plans again at once when a worker
            # starts or ends, on the reading the last start was allowed on (one slot left is no exception).
            ramped = 0
        if ramped < allowed and not self.options.dry_run:  # a dry run shows the launch at this reading
            return ramped, RAMP, f"ramping up ({detail}): one start per fresh load reading"
        return allowed, "resources", f"machine busy ({detail})"

    # -- the transaction -------------------------------------------------------------------------------

    def launch(self, view: OrderView, owner: "Owner | None" = None, only: Iterable[str] | None = None,
               explain: bool = True, recover: bool = True, ending: Collection[str] = (),
               released: Collection[str] = (), ranked_before: Collection[str] | None = None) -> LaunchReport:
        """Recover, plan and start what may start. `owner` None means detached workers that finish themselves.

        A supervisor passes recover=False while it knows no owner died since its last look, and as `ending` the
        keys of its workers that ended but whose outcome it has not recorded yet (they take no slot), and as
        `released` those of them whose files are free too (no reviewer follows); `ranked_before`: only tasks
        ranked before all of these ids may start (ranked after this round's refresh; the plan looks at no other).
        """
        report = LaunchReport()
        # A dry run takes no lock: it must not create or change a single byte, .aipm/ included.
        with nullcontext() if self.options.dry_run else self.runtime.launch_lock(), scope.shared():
            order = view.refresh()
            if recover and not self.options.dry_run:
                report.recovered = recovery.recover_order(self, order, adopt=owner, only=only)
                report.failed += [{"id": item["id"], "error": item["error"]} for item in report.recovered
                                  if "error" in item]
                if report.recovered:
                    order = view.refresh()
            # Who holds locks outside aipm is read from /proc/locks, and that read makes the kernel wait for an
            # RCU grace period (milliseconds, with every flock on the machine held up meanwhile). The hot path
            # plans without it and reads it only when a lock turns out to be taken after all, then plans again.
            # A start that failed plans again too, without that task (see _plan_and_start): it ends, as a task
            # fails at most once per launch.
            careful = explain
            while self._plan_and_start(view, order, owner, only, explain, careful, report, ending, released,
                                       ranked_before):
                careful = True
        return report

    def _plan_and_start(self, view: OrderView, order: Order, owner: "Owner | None", only: Iterable[str] | None,
                        explain: bool, careful: bool, report: LaunchReport, ending: Collection[str] = (),
                        released: Collection[str] = (), ranked_before: Collection[str] | None = None) -> bool:
        """One plan and its starts, into `report`. Returns True when the caller should plan again (carefully): a
        start found a target lock taken while the plan had not looked at locks held outside aipm, or a start
        failed (the next plan leaves that task out, so its files and slot go to the tasks ranked after it)."""
        records = report.records = self.records()
        report.order = order
        noted = len(report.failed)  # the failures of this plan's starts, kept in their tasks' files below
        # A foreground exec's task, or a foreground nested run's starts, take the slot of the worker that waits for
        # them (slots.py): a run of a sub-order inside a task (`command: aipm run SUB`) under max_workers 1 started
        # nothing and exited 1, its every slot held by the worker it runs in, as a recursive make without its token.
        lent = borrowed(records) if owner is not None else []
        if lent:
            ending = {*ending, *lent}
        if not explain and sum(rec.key not in ending and rec.alive() for rec in records) >= self.settings.max_workers:
            ready = view.ready_ordering()
            said = self.demands.said(order.id)
            # A ready task more urgent than the one said (added, or its dependency done, while every slot is taken)
            # may wait for a slot, and must be said at once: else a P0 waited behind every P3 of another run. Only
            # the plan below tells whether it waits for a slot or for a file: said blindly, a P0 kept out by a file
            # had another run leave a slot free for it that nothing here could take.
            if owner is None or not ready or self.options.dry_run or (
                    said is not None and order.tasks[ready[0]].priority.rank >= said[0].rank):
                report.plan, report.deferred = Plan(), []
                return False  # every slot is taken: nothing can start, and a plan would only say so
        busy, live, live_count = self.holders(order, records, ending, released, view.running)
        free = max(0, self.settings.max_workers - live_count)
        # The costs as the budget counts them (spending.charged) are the plan's and the caps'; the tasks start as
        # their files say (a start's record keeps the file's counters, restore.counters).
        counted = charged(order, self.runtime)
        spend = self.budget(counted, records)
        outside = self.outside(records) if careful else []
        # With `only` (exec's task), the plan chooses among those alone: a task this launch will not start must
        # not take their files "first this round". Nor may a task that failed to start in this launch: chosen
        # again, a P0 whose program is missing kept its file from a P3 sharing it, which never ran.
        tried = {item["id"] for item in report.failed}
        chosen = (lambda ids: ids) if only is None and not tried else (
            lambda ids: [t for t in ids if t not in tried and (only is None or t in only)])
        if explain:
            ids = chosen(view.ordering())
            options = dict(budget=spend, outside=outside)
        else:  # the hot path: only ready tasks, indexed by the view
            below = None if ranked_before is None else view.first_rank(ranked_before)
            ids = chosen(view.ready_ordering(below))
            options = dict(explain=False, running=view.running, budget=spend, outside=outside,
                           released={key.split("/", 1)[1] for key in released if key.startswith(f"{order.id}/")})
        refused = Refusals(order.tasks, machine_capacity) if self.settings.runner == "local" else {}
        slots = free
        while True:
            result = plan(counted, busy, live, slots, ids, refused=refused, **options)
            wanted, short = [order.tasks[t.id] for t in result.launchable], {}  # only `only`'s: the plan saw no other
            if self.settings.runner != "local" or not any(t.resources for t in wanted):
                break
            wanted, short = self.fitting(wanted, [r for r in records if r.key not in lent], order.id,
                                         [r for r in records if r.key in lent])
            if free + len(short) <= slots or len(result.launchable) < slots:
                break
            # A task waiting for CPUs or memory keeps its files, but no worker slot from the tasks ranked after it:
            # one that declares none waited, a slot idle, for the running task that held those CPUs to end.
            slots = free + len(short)
        if owner is not None and not self.options.dry_run and (short or ranked_before is None):
            self.demands.publish_need(order.id, next((t for t in result.launchable if t.id in short), None))
        report.plan = result
        report.deferred = [{"id": tid, "reason": "capacity", "detail": why} for tid, why in short.items()]
        # A start waits for the running attempts to end: exec waits, as for the machine, rather than exit. Not in an
        # aipm that an attempt runs (an agent's `aipm exec B`): the attempt holding the budget may be that one, or
        # one whose own agent's exec waits likewise on this one's; each would wait for the other's time limit.
        if result.held and not any(r.encloses_us() for r in records):
            report.deferred += [{"id": b.id, "reason": "budget", "detail": b.detail} for b in result.held]
        report.failed += [{"id": b.id, "error": b.detail} for b in result.refused]
        planned = len(report.failed)
        # The capped attempts the plan would start now, as many as the worker limit allows, share the budget, even
        # when the load lets fewer start at once: on a ramp (one start a second) the first one was given all of it,
        # and the others waited for it to end.
        together = sum(agents.caps_cost(agent) or spend is not None and uncapped(agent)
                       for agent in (agent_for(t, self.settings) for t in wanted))
        # Read the machine only when there is something to start: the idle loop costs no CPU.
        budget, why, note = self.start_budget(live_count) if wanted else (0, "", "")
        if budget:
            # The starts the load allows, not max_workers, are what more urgent runs' demands are left from: else,
            # under auto-scaling, the run whose worker ended took the one start for its next P3 every time.
            wanted = self._leave_slots(order, wanted, budget, live_count, report, len(lent))
        for task in wanted[budget:]:
            report.deferred.append({"id": task.id, "reason": why, "detail": note})
        waiting = result.limited
        if wanted[budget:] and (waiting is None or wanted[budget].priority.rank < waiting.rank):
            waiting = wanted[budget].priority  # held back by the load: it waits for a start as for a slot
        if owner is not None and not self.options.dry_run and (waiting or ranked_before is None):
            # (a plan of the first-ranked tasks only: no withdrawal)
            self.demands.publish(order.id, waiting, self.settings.max_workers)
        started: list[tuple[Task, Starting]] = []
        again = False
        caps = attempt_caps([counted.tasks[t.id] for t in wanted[:budget]], spend, together,
                            lambda t: agents.caps_cost(agent_for(t, self.settings)),
                            lambda t: uncapped(agent_for(t, self.settings)))
        try:  # (each with a share: the plan chose no more than the budget gives one, in the order it gives them)
            for task in wanted[:budget]:
                if self.options.dry_run:
                    report.launched.append({"id": task.id, "pid": None, "dry_run": True})
                    continue
                try:
                    started.append((task, self.start(order, task, owner, view, lent[0] if lent else "",
                                                     caps[task.id], spend.limit if spend is not None else None)))
                    if self._ramping:
                        # Spent by a start made, not by one tried: a task whose launch fails (its program
                        # missing) took the ramp's one start every round, and the tasks after it never started.
                        self._ramped_at = _now()
                except LaunchBusy as exc:  # locked since we planned, or a glob's directory lock: wait for it
                    if not careful:
                        again = True
                        break
                    report.deferred.append({"id": task.id, "reason": "file_busy", "detail": str(exc)})
                except LaunchFailed as exc:
                    report.failed.append({"id": task.id, "error": str(exc)})
            owned = any(starting.finish for _, starting in started)
            # Their statuses made durable (the round's directory fsync) while their workers' processes start; what
            # waits for that point (a snapshot's late save, which may still stop a worker) runs after each worker
            # is recorded, in the order it was queued, and then the gos.
            if owned:
                durable.sync_now()
            for task, starting in started:
                try:
                    rec = starting.done()
                except LaunchFailed as exc:
                    report.failed.append({"id": task.id, "error": str(exc)})
                    continue
                report.launched.append({"id": task.id, "pid": rec.pid or rec.owner_pid, "log": rec.log,
                                        "attempt": rec.serial})
            if owned:
                durable.flush()
        except BaseException:
            for _, starting in started:
                starting.abort()  # those not recorded yet: never left IN_PROGRESS with a wrapper waiting
            raise
        if not self.options.dry_run:
            for item in report.failed[noted:]:
                if item["id"] in order.tasks:
                    self.note_failure(order.tasks[item["id"]], item["error"], view)
        return again or len(report.failed) > planned

    def _leave_slots(self, order: Order, wanted: list[Task], free: int, live: int, report: LaunchReport,
                     lent: int = 0) -> list[Task]:
        """Of the tasks chosen (in launch order), those that may take a slot while more urgent tasks of other runs
        wait for one (demand.py): each such demand (of a run whose own limit lets it start one more beside the
        `live` workers) keeps one of the `free` starts (what the worker limit and the load allow) from every less
        urgent task. Not the slot of the worker we run inside (`lent`: how many workers we leave uncounted, slots.py):
        every other run counts that worker, so a start left to it went to no one, and a nested run whose demand came
        from its caller's own order waited for its caller's time limit."""
        urgent = self.demands.ahead_of(order.id, wanted[-1].priority, live + lent)
        if not urgent:
            return wanted
        room = max(0, self.settings.max_workers - live - lent)  # the slots the other runs see free
        kept = []
        for task in wanted:
            before = [d for d in urgent if d[1].rank < task.priority.rank]
            if len(kept) + min(len(before), room) < free:
                kept.append(task)
                continue
            other, priority = min(before, key=lambda d: (d[1].rank, d[0]))
            report.deferred.append({"id": task.id, "reason": LIMIT, "detail": f"a free worker slot is left to a "
                                    f"{priority} task of order {other}, which waits for one"})
        return kept

    def budget(self, order: Order, records: Iterable[Record]) -> Budget | None:
        """The order's budget (budget.of), knowing which of its tasks cost nothing against it."""
        spend = order_budget(order, self.settings.max_cost_usd, records)
        if not spend:
            return spend
        agent = {t.id: agent_for(t, self.settings) for t in order.tasks.values()}
        return replace(spend, costless=frozenset(t for t, a in agent.items() if not agents.reports_cost(a)),
                       uncapped=frozenset(t for t, a in agent.items() if uncapped(a)))

    def launch_ramped(self, view: OrderView) -> LaunchReport:
        """launch() with detached owners, repeated while the ramp-up holds starts back for a fresh reading.

        For callers without an event loop (`aipm launch`, a detached worker starting successors); `run` gets the
        same effect from its loop, which re-plans RESOURCE_RECHECK seconds after a deferral.
        """
        return self.ramp_on(view, self.launch(view))

    def ramp_on(self, view: OrderView, report: LaunchReport) -> LaunchReport:
        """After `report`'s launch (its detached owners): launched again while the ramp-up holds starts back for a
        fresh reading (see launch_ramped)."""
        while not self.options.dry_run and report.launched and any(d["reason"] == RAMP for d in report.deferred):
            time.sleep(RAMP_DELAY)
            more = self.launch(view, recover=False)
            report.launched += more.launched
            report.failed += more.failed
            report.deferred = more.deferred
            if not more.launched:
                break
        return report

    def fitting(self, tasks: list[Task], records: Iterable[Record], order_id: str, lent: Iterable[Record] = ()
                ) -> tuple[list[Task], dict[str, str]]:
        """The tasks (in order) of order `order_id` whose declared `resources` fit beside those of the live
        `records` on this machine, and what more urgent tasks of other runs wait for (demand.py); and id → why, of
        the others. Without that word a P0 of one run needing every CPU waited behind every P3 of another run
        needing one, each CPU going to the next of them as it freed. `lent`: the workers whose slot (and resources)
        the tasks take (slots.py)."""
        live = [r for r in records if r.alive()]
        used_cpus, used_memory = sum(r.cpus for r in live), sum(r.memory_mb for r in live)
        total, kept = machine_capacity(), self.demands.needs_ahead(order_id)
        lenders = [r for r in lent if r.alive()]
        if lenders:
            # A need that cannot be met beside the lenders waits for their end, and so for ours: kept from us, a
            # borrower whose caller's order had a P0 asking for every CPU waited for its caller's time limit.
            cpus, memory = sum(r.cpus for r in lenders), sum(r.memory_mb for r in lenders)
            kept = [k for k in kept if k[1] <= total.cpus - cpus
                    and (total.memory_mb is None or k[2] <= total.memory_mb - memory)]
        start, waiting, _ = fit(tasks, total, used_cpus, used_memory, kept)  # (the plan left out the refused)
        return start, waiting

    def refused_here(self, tasks: Iterable[Task]) -> dict[str, str]:
        """Id → why, of the tasks the local runner refuses whatever runs: they declare more than this machine has."""
        asking = [t for t in tasks if t.resources] if self.settings.runner == "local" else []
        return fit(asking, machine_capacity(), 0.0, 0)[2] if asking else {}


_now = time.monotonic

RAMP = "ramp_up"  # deferral reason: started one at a time on a busy machine; the others follow a fresh reading
RESOURCE_RECHECK = 1.0  # seconds between load readings while launches are deferred (run, standby owners)
