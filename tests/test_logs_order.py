"""`aipm logs ORDER [-f]`: every worker's lines of an order, each tagged with its task id (parallel --tag)."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import no_workers, task_statuses, wait_for, write_task


def test_logs_of_an_order_tag_every_line_with_its_task(project):
    order = project.order()
    write_task(order, "A", command="echo a1; echo a2", target_files=["a"])
    write_task(order, "B", command="echo b1; printf 'b2 no newline'", target_files=["b"])
    write_task(order, "C", command='echo "c attempt $AIPM_ATTEMPT"; [ "$AIPM_ATTEMPT" = 2 ]', max_attempts=2)
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
    out = project.aipm("logs", "ORD", check=True).stdout.splitlines()
    assert all("\t" in line for line in out), out
    by_task = {}
    for line in out:
        tag, text = line.split("\t", 1)
        by_task.setdefault(tag, []).append(text)
    assert set(by_task) == {"A", "B", "C"}
    assert by_task["A"][:2] == ["a1", "a2"]
    assert by_task["B"][:2] == ["b1", "b2 no newline"]  # (aipm's line after it starts a line of its own)
    # Both attempts of C, the first before the second.
    attempts = [t for t in by_task["C"] if t.startswith("c attempt")]
    assert attempts == ["c attempt 1", "c attempt 2"]
    # A task argument still means that task's own log, untagged.
    assert project.aipm("logs", "A", check=True).stdout.splitlines()[:2] == ["a1", "a2"]


def test_logs_of_an_order_put_a_review_s_lines_between_its_attempt_s_end_and_its_verdict(project):
    """Each log file was printed whole, by its last write: a review's lines came before the attempt's own (or after
    its verdict). They come where they ran: after `attempt 1 ended`, before the `review sent back` line."""
    write_task(project.order(), "W", command="echo working", review="echo reviewing; echo 'FAIL: no tests'; exit 1",
               max_rework=0)
    project.aipm("run", "ORD")
    lines = [line.split("\t", 1)[1] for line in project.aipm("logs", "ORD", check=True).stdout.splitlines()]
    texts = [re.sub(r"^\[aipm [0-9:]+\] ", "", line) for line in lines]
    ended, sent = texts.index("attempt 1 ended: exit 0"), next(i for i, t in enumerate(texts) if "sent back" in t)
    assert texts.index("working") < ended < texts.index("reviewing") < texts.index("FAIL: no tests") < sent, lines


def test_aipm_lines_start_a_line_of_their_own_after_output_without_a_newline(project):
    """A command's last output without a newline (`printf "progress 50"`) ran on into aipm's line
    (`progress 50[aipm 04:55:30] attempt 1 ended: exit 2`), in the task's log and the order's."""
    write_task(project.order(), "T", command='printf "progress 50"; exit 2')
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 1
    own = project.aipm("logs", "ORD/T", check=True).stdout
    assert own.endswith("\n") and own.splitlines()[0] == "progress 50", own
    assert re.fullmatch(r"\[aipm \d\d:\d\d:\d\d\] attempt 1 ended: exit 2", own.splitlines()[1]), own
    tagged = project.aipm("logs", "ORD", check=True).stdout
    assert tagged.endswith("\n") and tagged.splitlines()[:2] == ["T\tprogress 50", "T\t" + own.splitlines()[1]]


def test_the_notify_log_gets_aipm_lines_on_lines_of_their_own(project):
    """A notify command's output without a newline ran on into aipm's note of the next event."""
    (project.root / "aipm.yaml").write_text("notify: 'true'\n")
    (project.root / ".aipm").mkdir(exist_ok=True)
    (project.root / ".aipm" / "notify.log").write_text("said by the last notify command")
    write_task(project.order(), "T", command="exit 3")
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 1
    lines = (project.root / ".aipm" / "notify.log").read_text().splitlines()
    assert lines[0] == "said by the last notify command" and lines[1].startswith("[aipm "), lines


def _launched_and_followed(project, task: str, said: str, follow: str) -> subprocess.Popen:
    """`aipm launch ORD`; once `task`'s first log holds `said`, `aipm logs FOLLOW -f` started on it."""
    project.aipm("launch", "ORD", check=True)
    log = project.root / ".aipm" / "logs" / "ORD" / f"{task}.1.log"
    wait_for(lambda: log.exists() and said in log.read_text())
    return subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", follow, "-f"],
                            stdout=subprocess.PIPE, text=True)


def test_logs_order_follow_picks_up_a_new_attempt_and_ends_with_the_order(project, gate):
    order = project.order()
    write_task(order, "A", max_attempts=2, command=(
        f'echo "attempt $AIPM_ATTEMPT"; [ "$AIPM_ATTEMPT" = 2 ] && exit 0; '
        f'while [ ! -e {gate} ]; do sleep 0.05; done; exit 1'))
    follower = _launched_and_followed(project, "A", "attempt 1", "ORD")
    # Only once the follower has shown the first attempt is the second one allowed to start.
    first = follower.stdout.readline()
    assert first == "A\tattempt 1\n"
    gate.touch()
    rest, _ = follower.communicate(timeout=120)  # it ends by itself once the order is settled
    assert follower.returncode == 0
    lines = rest.splitlines()
    assert "A\tattempt 2" in lines
    assert lines.index("A\tattempt 2") > next(i for i, l in enumerate(lines) if "attempt 1 ended: exit 1" in l)
    assert task_statuses(order) == {"A": "DONE"}
    wait_for(lambda: no_workers(project.root))


def test_logs_order_follow_ends_when_a_budget_leaves_nothing_that_can_start(project):
    """An end-to-end session: the order's budget stopped it (the rest QUEUED until someone raises it), and
    `aipm logs ORDER -f` followed it for ever, as it did an order whose tasks wait behind one that spent its own
    max_cost_usd."""
    order = project.order()
    write_task(order, "A", command="echo a", target_files=["a"])
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
    write_task(order, "C", command="true", target_files=["c"], max_cost_usd=0.1, cost_usd=0.1)  # as aipm records
    write_task(order, "D", command="true", depends_on=["C"], target_files=["d"])  # behind C's own budget
    followed = project.aipm("logs", "ORD", "-f", timeout=60)  # (a guard: it hung)
    assert followed.returncode == 0 and "A\ta" in followed.stdout.splitlines(), followed.stdout + followed.stderr
    # Why it ended, after the lines (it ended without a word, as if all were done)
    assert followed.stderr.splitlines() == [
        "aipm: ORD: C will not start: budget reached: the task's attempts cost $0.1000 of its max_cost_usd $0.1000; "
        "raise it to go on", "aipm: ORD: D will not start until C does: budget reached: the task's attempts cost "
        "$0.1000 of its max_cost_usd $0.1000; raise it to go on"], followed.stderr
    with (order / "A.yaml").open("a") as spent:
        spent.write("cost_usd: 0.1\n")
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")  # reached by A's cost
    write_task(order, "B", command="true", depends_on=["A"], target_files=["b"])  # A is DONE, but the budget
    followed = project.aipm("logs", "ORD", "-f", timeout=60)
    assert followed.returncode == 0 and "A\ta" in followed.stdout.splitlines(), followed.stdout + followed.stderr
    assert "aipm: ORD: B will not start: budget reached: the order's attempts cost" in followed.stderr, \
        followed.stderr


def test_logs_of_an_order_none_of_whose_tasks_has_run_say_so(project, gate):
    """`aipm logs ORDER` printed nothing and `-f` waited without a word where `logs TASK` said `no log ... yet` and
    `waiting for ... to start`: both now say it on stderr (exit 0), and the follower then shows the lines."""
    write_task(project.order(), "A", command="echo a-ran", target_files=["a"])
    unrun = project.aipm("logs", "ORD")
    assert (unrun.returncode, unrun.stdout, unrun.stderr) == (0, "", "aipm: no log for ORD yet (none of its tasks has "
                                                                     "run)\n")
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "ORD", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stderr.readline() == "aipm: waiting for a task of ORD to start (Ctrl-C stops)\n"
        assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0 and "A\ta-ran" in out.splitlines() and err == "", out + err


def test_logs_follow_of_a_task_not_started_yet_waits_for_its_first_attempt(project):
    """`aipm logs B -f` before B has run exited 2 ('no log ... yet'), unlike `tail -F`: it now waits while B may
    still start, then follows its log to B's end. Without -f, or for a task that can no longer run, it says there
    is no log, exit 0 (nothing to show is no usage error: `aipm logs ORDER` says the same so)."""
    order = project.order()
    write_task(order, "B", command="echo hello-from-b", target_files=["b"])
    write_task(project.order("O2"), "X", command="true", status="CANCELLED")
    write_task(project.order("O2"), "Y", command="true", depends_on=["X"])
    unrun = project.aipm("logs", "B")
    assert (unrun.returncode, unrun.stdout, unrun.stderr) == (0, "", "aipm: no log for ORD/B yet (it has not run)\n")
    assert project.json("logs", "B") == {"order": "ORD", "task": "B", "attempt": None, "attempts": [], "log": None,
                                         "text": ""}
    cancelled = project.aipm("logs", "O2/X", "-f", timeout=30)  # cancelled: it will never run
    assert cancelled.returncode == 0 and "no log for O2/X yet" in cancelled.stderr, cancelled.stderr
    behind = project.aipm("logs", "O2/Y", "-f", timeout=30)  # nor will what waits on it
    assert behind.returncode == 0 and "O2/Y can never run: X is CANCELLED" in behind.stderr, behind.stderr
    out = _follow_through_a_run(project, "B", "waiting for ORD/B to start (QUEUED")  # (said before B has run)
    assert "hello-from-b" in out


def _follow_through_a_run(project, task: str, said: str, then=lambda: None) -> str:
    """`aipm logs TASK -f` started before a run of ORD: its first line on stderr (`said`: it waits), then what it
    printed to stdout once the run ended (it ends with it). `then`: what is done before the run starts."""
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", task, "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = follower.stderr.readline()
        assert first.startswith(said), first
        then()
        assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0, out + err
    return out


def test_logs_follow_of_a_task_not_started_yet_waits_while_a_sibling_file_does_not_validate(project):
    """`aipm logs B -f` read the whole order to see whether B may still start: a sibling's file saved invalid (a
    run waits for its fix) ended the wait at once, 'no log for ORD/B yet'. It waits on; B runs once it is fixed."""
    order = project.order()
    write_task(order, "B", command="echo hello-from-b", target_files=["b"])
    broken = order / "C.yaml"
    broken.write_text("title: oops\npriority: P9\n")
    out = _follow_through_a_run(project, "B", "waiting for ORD/B to start (QUEUED",
                                then=lambda: broken.write_text("title: fixed\ncommand: echo c\n"))
    assert "hello-from-b" in out


def test_logs_follow_after_a_retry_waits_for_the_next_attempt(project):
    """`aipm retry B; aipm logs B -f` printed the old attempt's log and exited, though B was about to run again: it
    now waits for the next attempt (as for a task not run yet) and follows it to its end."""
    write_task(project.order(), "B", command="cat said", target_files=["said"])
    (project.root / "said").write_text("first-attempt\n")
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
    assert project.aipm("retry", "B").returncode == 0
    (project.root / "said").write_text("second-attempt\n")
    out = _follow_through_a_run(project, "B", "waiting for ORD/B to start again (QUEUED")  # (the old one printed)
    assert out.index("first-attempt") < out.index("second-attempt"), out


def test_logs_follow_of_a_queued_task_past_its_budget_says_it_will_not_start(project):
    """A claude attempt stopped at its task's budget leaves the task QUEUED, never to start again until the budget
    is raised: `logs A -f` printed the attempt, then waited for another, for ever. It says why and ends."""
    from test_agents import agent_env

    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="@cost 0.06", max_cost_usd=0.05, target_files=["a"])
    write_task(project.order(), "B", prompt="x", depends_on=["A"], target_files=["b"])  # (nor will B, after A)
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    assert project.statuses() == {"A": "QUEUED", "B": "QUEUED"}
    followed = project.aipm("logs", "A", "-f", timeout=30)
    assert followed.returncode == 0 and followed.stdout, followed.stdout + followed.stderr
    assert followed.stderr.startswith("aipm: ORD/A will not start: budget reached: the task's attempts cost"), \
        followed.stderr
    behind = project.aipm("logs", "B", "-f", timeout=30)
    assert behind.returncode == 0 and behind.stderr.startswith(
        "aipm: ORD/B will not start until A does: budget reached"), behind.stderr



def test_logs_follow_of_a_rework_past_a_budget_says_it_will_not_start(project):
    """A task on its way back from a review waits for its next attempt like a QUEUED one; past its order's budget,
    or its own, it has none to wait for: said, exit 0 (the rule `logs -f` shares with `logs ORDER -f` had looked
    at QUEUED tasks alone, and it waited for ever)."""
    (project.order() / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    write_task(project.order(), "A", command="true", status="REWORK", cost_usd=0.1, target_files=["a"])
    write_task(project.order(), "B", command="true", status="REWORK", cost_usd=0.05, max_cost_usd=0.05,
               target_files=["b"])
    for task, words in (("A", "budget reached: the order's attempts cost $0.1500"),
                        ("B", "budget reached: the task's attempts cost $0.0500")):
        followed = project.aipm("logs", task, "-f", timeout=30)
        assert followed.returncode == 0, followed.stderr
        assert followed.stderr.startswith(f"aipm: ORD/{task} will not start: {words}"), followed.stderr


def test_an_interrupted_task_is_a_dead_end_until_retried(project):
    """INTERRUPTED with no record of its attempt left: its worker ended and its exit code was lost, and only a
    person can tell whether its work is done (no run starts it again). `run` ended `INTERRUPTED 1, QUEUED 1` with no
    word of why X never started, `status` showed I as still waited on, and `logs X -f`, `logs I -f` and
    `logs ORD -f` each waited for ever. Each now names I and the retry that goes on."""
    write_task(project.order(), "I", command="echo i", status="INTERRUPTED", target_files=["i"])
    write_task(project.order(), "X", command="echo x", depends_on=["I"], target_files=["x"])
    run = project.aipm("run", "ORD")
    retry = "check its work, then `aipm retry I`"
    assert run.returncode == 1 and f"aipm: X can never run: I is INTERRUPTED; its worker ended and its exit code " \
        f"was lost: {retry} and run again" in run.stderr, run.stdout + run.stderr
    assert "I✗" in project.aipm("status", "ORD", "--wide").stdout
    for task, words in (("X", "can never run: I is INTERRUPTED"),
                        ("I", "will not start again by itself: it is INTERRUPTED")):
        followed = project.aipm("logs", task, "-f", timeout=30)
        assert followed.returncode == 0 and followed.stderr.startswith(f"aipm: ORD/{task} {words}"), followed.stderr
        assert retry in followed.stderr
    whole = project.aipm("logs", "ORD", "-f", timeout=30)
    assert whole.returncode == 0 and f"aipm: ORD: X can never run: I is INTERRUPTED; its worker ended and its exit " \
        f"code was lost: {retry}\n" in whole.stderr, whole.stderr
    assert project.aipm("retry", "I").returncode == 0
    assert project.aipm("run", "ORD").returncode == 0 and project.statuses() == {"I": "DONE", "X": "DONE"}


def test_a_retry_that_leaves_its_task_past_its_budget_says_so(project):
    """`aipm cancel A` spent A's own budget (its attempt's cap, not reported): `status` advised `aipm retry A`, which
    said `A: QUEUED`, and the next run started nothing. The advice names the budget, and the retry says it."""
    write_task(project.order(), "A", command="true", status="CANCELLED", cost_unreported_usd=0.5, max_cost_usd=0.5,
               target_files=["a"])
    write_task(project.order(), "B", command="true", depends_on=["A"], target_files=["b"])
    assert ("B can never run: A is CANCELLED; fix what stopped it and raise its max_cost_usd (its attempts cost "
            "unknown: up to $0.5000 not reported by their attempts of $0.5000), then `aipm retry A`"
            ) in project.aipm("status", "ORD").stdout
    retry = project.aipm("retry", "A")
    assert retry.returncode == 0 and retry.stdout == "A: QUEUED\n", retry.stdout
    assert retry.stderr.startswith("aipm: ORD/A will not start: budget reached: the task's attempts cost"), \
        retry.stderr


# -- the tail the followers read with (logs -f, the dashboard's live log) ------------------------------------


def _peak(action) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_last_lines_of_a_big_log_are_found_without_holding_the_log(tmp_path):
    """A page connecting to a 400 MB log held 2.5 times it in memory (read whole, split, cut to 200 lines)."""
    from aipm.logbook import Tail

    log = tmp_path / "T.1.log"
    with open(log, "wb") as handle:
        for block in range(40):
            handle.write(b"".join(b"line %d of block %d %s\n" % (i, block, b"x" * 400) for i in range(1000)))
    tail = Tail(skip=1 << 18)
    lines: list[str] = []
    peak = _peak(lambda: (tail.start(log, last=200), lines.extend(tail.read(log))))
    assert len(lines) == 200 and lines[-1].startswith("line 999 of block 39 ")
    assert peak < 4 << 20, peak  # the log is 16 MB


def test_a_line_without_end_comes_in_pieces_and_nothing_is_lost(tmp_path):
    from aipm.logbook import LONGEST, Tail

    log = tmp_path / "T.1.log"
    text = ("é" * (3 * LONGEST)).encode()  # two bytes a character: a piece never splits one
    log.write_bytes(text + b"\nend\n")
    pieces: list[str] = []
    peak = _peak(lambda: pieces.extend(Tail().read(log)))
    assert "".join(pieces[:-1]).encode() == text and pieces[-1] == "end"
    assert all(len(p.encode()) <= LONGEST for p in pieces) and peak < 8 * LONGEST + (2 << 20)


def test_a_log_truncated_or_replaced_while_followed_is_read_from_its_start(tmp_path):
    """A worker's `truncate -s 0` of its log: the follower kept its offset and showed nothing more."""
    from aipm.logbook import Tail

    log = tmp_path / "T.1.log"
    log.write_text("".join(f"old {i}\n" for i in range(300)))
    tail = Tail()
    assert len(list(tail.read(log))) == 300
    with open(log, "r+") as handle:
        handle.truncate(0)
    with open(log, "a") as handle:
        handle.write("new 1\nnew 2\nnew 3\n")
    assert list(tail.read(log)) == ["new 1", "new 2", "new 3"]
    fresh = tmp_path / "fresh"
    fresh.write_text("".join(f"other {i}\n" for i in range(400)))
    fresh.replace(log)  # a new file, longer than the offset
    assert list(tail.read(log))[:2] == ["other 0", "other 1"]


def test_a_burst_beyond_the_skip_gives_only_its_end_after_a_note(tmp_path):
    from aipm.logbook import Tail

    log = tmp_path / "T.1.log"
    log.write_text("first\n")
    tail = Tail(skip=1000)
    assert list(tail.read(log)) == ["first"]
    with open(log, "a") as handle:
        handle.write("".join(f"burst {i:05d}\n" for i in range(10000)))
    lines = list(tail.read(log))
    assert lines[0].startswith("[aipm] … ") and lines[-1] == "burst 09999"
    assert sum(len(line) + 1 for line in lines[1:]) <= 1000 and lines[1].startswith("burst ")


def test_a_read_ends_at_the_size_the_log_had_when_it_began_and_the_rest_comes_next(tmp_path):
    """A worker that writes faster than the dashboard reads had `Tail.read` follow it for as long as it wrote
    (each chunk read found more). A read stops at the size it saw at its start; what came after is the next
    read's, none of it lost."""
    from aipm.logbook import CHUNK, Tail

    log = tmp_path / "T.1.log"
    first = [f"before {i:07d} {'x' * 100}" for i in range(3 * CHUNK // 100)]
    log.write_text("".join(line + "\n" for line in first))
    tail = Tail()
    lines = tail.read(log)
    got = [next(lines)]  # the read has begun: its size is taken
    with open(log, "a") as handle:
        handle.write("".join(f"after {i}\n" for i in range(1000)))
    got += lines
    assert got == first
    assert list(tail.read(log)) == [f"after {i}" for i in range(1000)]


def test_a_burst_in_many_logs_at_once_reads_a_share_of_the_live_budget_from_each(tmp_path):
    """Forty logs that each grew by a megabyte in one burst had the dashboard read 256 KiB of each (10 MiB for a
    page that keeps 2,000 lines); a log removed after it changed ended the page's live stream (its mtime read
    after a check that it exists). Now the burst reads LIVE_BYTES in all, each log's end, and a removed log is
    nothing to read."""
    from aipm.ui.app import MIN_SHARE, _grown
    from aipm.ui.stream import LIVE_BYTES, LiveLog

    order = tmp_path / ".aipm" / "logs" / "ORD"
    order.mkdir(parents=True)
    live = LiveLog()
    logs = [order / f"T{n:02d}.1.log" for n in range(40)]
    for log in logs:
        log.write_text("start\n")
    assert len(_grown(live, set(logs))) == 40
    for n, log in enumerate(logs):
        with open(log, "a") as handle:
            handle.write("".join(f"T{n:02d} line {i:06d} {'y' * 60}\n" for i in range((1 << 20) // 80)))
    gone = order / "GONE.1.log"
    lines = _grown(live, {*logs, gone})
    read = sum(len(item["line"]) + 1 for item in lines if not item["line"].startswith("[aipm] "))
    assert read <= max(LIVE_BYTES, 40 * MIN_SHARE), read
    last = {item["task"]: item["line"] for item in lines}
    assert all(last[f"T{n:02d}"].startswith(f"T{n:02d} line {(1 << 20) // 80 - 1:06d} ") for n in range(40)), last


def test_logs_order_follow_ends_when_the_order_directory_is_removed(project):
    """A follower of an order with a task that could still start waited for it; with the order's directory removed
    (a `git checkout` of a branch without it) nothing of it can start again, yet it judged by the order as last
    read and followed for ever. It ends once no worker of the order runs."""
    import shutil

    order = project.order()
    write_task(order, "A", command="true")
    logs = project.root / ".aipm" / "logs" / "ORD"
    logs.mkdir(parents=True)
    (logs / "A.1.log").write_text("an earlier attempt\n")
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "ORD", "-f"],
                                stdout=subprocess.PIPE, text=True)
    assert follower.stdout.readline() == "A\tan earlier attempt\n"
    shutil.rmtree(order)
    try:
        follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0


@pytest.mark.parametrize("followed, tag", [("D", "{}\t"), ("D/T", "")], ids=["order", "task"])
def test_logs_follow_ends_when_the_order_directory_is_moved_away_under_its_workers(project, gate, tmp_path,
                                                                                   followed, tag):
    """A tester's session: `aipm launch D; aipm logs D -f &`, then `mv orders/D elsewhere`. The workers ended (their
    owners cannot record the outcomes: the files are gone, so their records stay for `aipm recover`, and `aipm ps`
    says `gone`), yet the follower (of the order, or of a task) took those records for workers still to wait on
    and followed for ever. It ends once none of them runs (watching.md), exit 0, every line shown once."""
    order = project.order("D")
    for name in ("T", "U"):
        write_task(order, name, target_files=[name.lower()],
                   command=f"echo {name} start; while [ ! -e {gate} ]; do sleep 0.05; done; echo {name} end")
    write_task(order, "V", depends_on=["T"], command="echo v")
    project.aipm("launch", "D", check=True)
    wait_for(lambda: (project.root / ".aipm/logs/D/T.1.log").exists())
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", followed, "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline() in {tag.format(name) + f"{name} start\n" for name in ("T", "U")}
        # Both commands running first: under load T's owner had not started it yet, and the move made its start
        # fail ('cannot start worker: .../T.yaml: cannot read'), with no `T end` to follow
        logs = [project.root / f".aipm/logs/D/{name}.1.log" for name in ("T", "U")]
        wait_for(lambda: all(log.exists() and " start" in log.read_text() for log in logs))
        order.rename(tmp_path / "elsewhere")
        gate.touch()
        wait_for(lambda: not any(w["alive"] for w in project.json("ps")["workers"]), timeout=30)
        out, err = follower.communicate(timeout=20)
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    lines = out.splitlines()
    assert tag.format("T") + "T end" in lines and len(lines) == len(set(lines)), out


def test_logs_order_follow_parses_only_the_task_files_that_changed(project):
    """The follower reads the order again at every change to know when it is settled: each read parsed every
    task file again (a 1000-task order: a second of CPU per status a run wrote). Counted as opens of a file that
    does not change (inotify IN_OPEN): one, however many changes the follower reads."""
    import time

    from aipm.inotify import DirWatch

    order = project.order()
    write_task(order, "A", command="true", status="DONE")
    write_task(order, "B", command="true", status="QUEUED", target_files=["b"])
    logs = project.root / ".aipm" / "logs" / "ORD"
    logs.mkdir(parents=True)
    (logs / "A.1.log").write_text("done before\n")
    time.sleep(2.2)  # past the parse cache's racy window (RACY_NS): A's version can be told from any later one
    opens = DirWatch.open(str(order), 0x020)  # IN_OPEN
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "ORD", "-f"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline() == "A\tdone before\n"
        for i in range(5):  # changes the follower reads the order again for (B stays QUEUED: it goes on)
            write_task(order, f"C{i}", command="true", status="DONE")
            (logs / "A.1.log").open("a").write(f"change {i}\n")
            assert next_line(follower) == f"A\tchange {i}\n"
        write_task(order, "B", command="true", status="CANCELLED", target_files=["b"])  # settled: it ends
        follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0
    assert sum(name == "A.yaml" for _, name in opens.events()) == 1
    opens.close()


def next_line(follower, timeout: float = 60) -> str:
    """The follower's next line; '' (a failed comparison, not a hung test) when none comes."""
    import select

    return follower.stdout.readline() if select.select([follower.stdout], [], [], timeout)[0] else ""



def test_logs_order_follow_ends_when_the_spending_ledger_leaves_no_budget(project):
    """The run counts the budget from the spending ledger when a task file says less (a worker's `git checkout`
    of the file took its cost away): the order is stopped, and `aipm logs ORDER -f`, which judged by the file's
    figure alone, followed it for ever."""
    import json

    from aipm.runtime import Runtime

    order = project.order()
    write_task(order, "A", command="echo a", target_files=["a"])
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
    ledger = Runtime(project.root).ledger_paths("ORD", writing=True)[0]
    ledger.write_text(json.dumps({"task": "A", "attempt": 1, "phase": "work", "definition": "", "cost_usd": 0.1,
                                  "cost_unreported_usd": 0.0}) + "\n")
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")  # reached by A's cost, in the ledger alone
    write_task(order, "B", command="true", depends_on=["A"], target_files=["b"])
    assert "budget reached" in project.aipm("why", "B").stdout  # as run and launch count it
    followed = project.aipm("logs", "ORD", "-f", timeout=30)
    assert followed.returncode == 0 and "A\ta" in followed.stdout.splitlines(), followed.stdout + followed.stderr


def test_logs_of_a_task_whose_log_a_worker_removed_say_it_ran(project):
    """A later worker's `rm -rf .aipm` took DAEMON's log: `aipm logs H/DAEMON` said "no log for H/DAEMON yet (it
    has not run)" of a task DONE after its attempt, and `aipm logs H` left its lines out without a word. Both now
    say the log was removed since it ran, with what the task file says of its attempts."""
    order = project.order("H")
    write_task(order, "DAEMON", command="echo daemon")
    write_task(order, "CLEAN", depends_on=["DAEMON"], command="rm -rf .aipm; echo clean")
    assert project.aipm("run", "H", "--no-resource-monitoring").returncode == 0
    assert task_statuses(order) == {"DAEMON": "DONE", "CLEAN": "DONE"} and no_workers(project.root)
    gone = "no log for H/DAEMON: removed since it ran (its file says DONE, attempts 1, the last started "
    task = project.aipm("logs", "H/DAEMON")  # nothing to show is no usage error (exit 2), as for the order
    assert task.returncode == 0 and task.stdout == "", task
    assert task.stderr.startswith(f"aipm: {gone}") and task.stderr.count("\n") == 1, task.stderr
    whole = project.aipm("logs", "H", check=True)
    assert whole.stderr.startswith(f"aipm: {gone}") and whole.stderr.count("\n") == 1, whole.stderr
    assert whole.stdout.startswith("CLEAN\t[aipm ") and "\nDAEMON\t" not in whole.stdout, whole.stdout
    write_task(order, "NEW", command="true")
    assert project.aipm("logs", "H/NEW").stderr == "aipm: no log for H/NEW yet (it has not run)\n"


@pytest.mark.parametrize("how", [": >", "rm -f"], ids=["truncated", "removed"])
def test_logs_task_follow_reads_a_log_its_worker_truncated_or_removed_from_its_start(project, gate, how):
    """`logs T -f` kept reading at its old offset: after the worker's `: > log` it printed the tail of aipm's
    closing line alone and lost what came before it; after `rm -f log` it read the removed file to the end and
    never showed the closing line aipm writes into the new one (the only line that gives the outcome)."""
    write_task(project.order(), "T", target_files=["t.txt"], command=(
        'L=.aipm/logs/$AIPM_ORDER_ID/$AIPM_TASK_ID.$AIPM_ATTEMPT.log; echo before-1; echo before-2; '
        f'while [ ! -e {gate} ]; do sleep 0.05; done; {how} "$L"; echo after-1; echo after-2; exit 4'))
    follower = _launched_and_followed(project, "T", "before-2", "T")
    assert [follower.stdout.readline(), follower.stdout.readline()] == ["before-1\n", "before-2\n"]
    gate.touch()
    rest, _ = follower.communicate(timeout=120)
    lines = rest.splitlines()
    if how == ": >":  # (removed: the lines went into the file removed before they were read)
        assert lines[:2] == ["after-1", "after-2"], rest
    assert re.fullmatch(r"\[aipm [0-9:]+\] attempt 1 ended: exit 4", lines[-2]), rest
    assert lines[-1].endswith("] FAILED (exit 4): no next attempt starts; `aipm retry T` starts it anew"), rest


def test_logs_follow_ends_when_a_task_s_launch_failed_for_good(project):
    """`run` says `failed K2: needs 100 CPU(s) …` and ends, exit 1; `logs ORD -f` (and `logs ORD/K3 -f`) waited for
    ever for K2, and K3 behind it, to start: nothing tries K2 again until a person launches the order."""
    order = project.order()
    write_task(order, "K2", command="true", target_files=["k2"], resources={"cpus": 100})
    write_task(order, "K3", command="true", target_files=["k3"], depends_on=["K2"])
    assert project.aipm("launch", "ORD", "--no-resource-monitoring").returncode == 1
    followed = project.aipm("logs", "ORD", "-f", timeout=30)  # (a guard: it hung)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    said = followed.stderr.splitlines()
    assert said[-2].startswith("aipm: ORD: K2 will not start by itself: its last launch failed: needs 100 CPU(s)") \
        and said[-1] == "aipm: ORD: K3 will not start until K2 does: its last launch failed", said
    behind = project.aipm("logs", "ORD/K3", "-f", timeout=30)
    assert behind.stderr.startswith("aipm: ORD/K3 will not start until K2 does"), behind.stderr


def test_logs_follow_waits_for_a_task_whose_launch_failed_while_a_run_that_tries_it_again_lives(project, gate,
                                                                                                   tmp_path):
    """B's program is missing as the run starts A: its launch fails, and the run tries it again as A ends. `logs
    ORD/B -f` said at once that B `will not start by itself` and ended, while the run started B once its program
    was there (a person installing it meanwhile)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])
    write_task(order, "B", command=["late-prog-xyz"], target_files=["b"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                            "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env)
    follow = None
    try:
        wait_for(lambda: "launch failed" in (yaml.safe_load((order / "B.yaml").read_text()).get("reason") or ""))
        follow = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "ORD/B", "-f"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            follow.wait(timeout=2)  # (it ended here at once)
        program = bin_dir / "late-prog-xyz"
        program.write_text("#!/bin/sh\necho hello from B\n")
        program.chmod(0o755)
    finally:
        gate.touch()
        out, _ = run.communicate(timeout=120)
    assert run.returncode == 0 and task_statuses(order) == {"A": "DONE", "B": "DONE"}, out
    followed, err = follow.communicate(timeout=60)
    assert follow.returncode == 0 and "hello from B" in followed, followed + err
    assert "will not start" not in err, err


@pytest.mark.parametrize("arg", ["A", "ORD"])
def test_logs_f_of_an_attempt_no_aipm_looks_after_says_so(project, arg):
    """`aipm logs A -f` (and `aipm logs ORD -f`) of a task whose worker was lost with its owner (`status`:
    INTERRUPTED, `ps`: gone) printed its lines and then waited in silence for ever: nothing writes to that log until
    `aipm recover` takes it up. It says so on stderr, and follows on once that is done."""
    import signal
    import time

    write_task(project.order(), "A", command="echo started; exec sleep 120", target_files=["a"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    wait_for(lambda: "started" in project.aipm("logs", "A").stdout)
    os.kill(worker["owner_pid"], signal.SIGKILL)
    os.killpg(worker["pgid"], signal.SIGKILL)
    wait_for(lambda: project.json("ps")["workers"][0]["state"] == "gone")
    follow = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", arg, "-f"],
                              cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "AIPM_ENABLE_MONITORING": "false"})

    def said() -> str:  # its next line on stderr, or "" after 20 seconds of silence
        import select

        return follow.stderr.readline() if select.select([follow.stderr], [], [], 20)[0] else ""

    try:
        line = said()
        assert "aipm: ORD/A: no aipm looks after this attempt" in line and "aipm recover ORD" in line, line
        assert follow.poll() is None  # still following: a recover's re-queue and next attempt come next
        if arg == "A":
            assert project.aipm("recover", "ORD").returncode == 0
            assert "waiting for ORD/A to start again" in said()
    finally:
        follow.kill()
        out, _ = follow.communicate()
    assert out.startswith("started\n" if arg == "A" else "A\tstarted\n"), out
