"""`aipm ui`: the dashboard in a real headless Chromium, and its token, Host and POST checks over plain HTTP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest

from conftest import REPO, no_workers, snapshot, state, task_statuses, wait_for, write_task
from invariants import KILL_OWNER, group_alive, pid_alive

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def started_ui(project, fd_limit: int | None = None):
    """`aipm ui --port 0` on the project (under `ulimit -n fd_limit`): the process and its URL (with the token)."""
    import resource

    # No keep-alive wake-up within any test: only change events may update the page.
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false", AIPM_UI_KEEPALIVE="3600")
    limit = None if fd_limit is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit)))
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "ui", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=limit)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and "?token=" in url, proc.stderr.read()
    return proc, url


@pytest.fixture
def dashboard(project):
    """`aipm ui --port 0` on the project; yields its URL (with the token)."""
    proc, url = started_ui(project)
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130  # Ctrl-C, as every aipm command reports it
    said = proc.stderr.read()
    assert "warning" not in said  # 127.0.0.1, the default: nothing to warn about
    # An open page's event stream is ended by the stop, not cancelled with a traceback after the grace.
    assert "Traceback" not in said and "ERROR" not in said, said


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="aipm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def boards_of(events):
    """The next whole board an open event stream (whole boards: no patches asked for) sends, at each call."""
    def next_board():
        while (line := events.readline()) != b"event: board\n":
            assert line, "the event stream ended"
        return json.loads(events.readline()[len(b"data: "):])
    return next_board


def status_code(url, method="GET", headers=None, data=None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def base_and_token(url):
    base, token = url.split("/?token=")
    return base, token


def row_status(driver, key):
    """The status shown in the row of ORDER/TASK (None while the row is not drawn)."""
    return driver.execute_script(
        "const r = document.querySelector(`tr[data-task='${arguments[0]}'] .status`); return r && r.textContent",
        key)


def click(driver, css):
    """Click what `css` finds, again if a live update redrew it between finding and clicking."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt():
        try:
            driver.find_element("css selector", css).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    wait_for(attempt)


def test_every_request_needs_the_token_and_this_host(project, dashboard, browser):
    order = project.order()
    write_task(order, "A", command="true")
    base, token = base_and_token(dashboard)
    wrong = "x" * len(token)
    for path in ("/", "/api/board", "/events", "/api/log?order=ORD&task=A"):
        sep = "&" if "?" in path else "?"
        assert status_code(base + path) == 403, path
        assert status_code(f"{base}{path}{sep}token={wrong}") == 403, path
        # A DNS-rebinding page names its own host, even with the token.
        assert status_code(f"{base}{path}{sep}token={token}", headers={"Host": "evil.example"}) == 403, path
    assert status_code(f"{base}/api/board?token={token}") == 200
    assert status_code(f"{base}/api/board", headers={"X-Aipm-Token": token}) == 200
    body = b'{"order": "ORD", "task": "A"}'
    json_type = {"Content-Type": "application/json"}
    for headers in ({}, {"X-Aipm-Token": wrong}):
        assert status_code(f"{base}/api/cancel", "POST", {**json_type, **headers}, body) == 403
    # POSTs take the token from the header only: a link or form carrying it in the query is refused.
    assert status_code(f"{base}/api/cancel?token={token}", "POST", json_type, body) == 403
    assert task_statuses(order) == {"A": "QUEUED"}
    browser.get(base + "/")
    assert "forbidden" in browser.find_element("tag name", "body").text
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/A") == "QUEUED")


def test_a_status_change_appears_without_a_reload(project, dashboard, browser, gate):
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/A") == "QUEUED")
    browser.execute_script("window.notReloaded = true")
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: row_status(browser, "ORD/A") == "IN_PROGRESS")
    gate.touch()
    wait_for(lambda: row_status(browser, "ORD/A") == "DONE")
    # A task added by hand shows up too, with its priority.
    write_task(order, "B", command="true", priority="P0", depends_on=["A"])
    wait_for(lambda: row_status(browser, "ORD/B") == "QUEUED")
    assert browser.execute_script("return window.notReloaded") is True
    wait_for(lambda: no_workers(project.root))


def test_the_merged_log_shows_two_workers_lines(project, dashboard, browser, gate):
    order = project.order()
    for tid in ("A", "B"):
        write_task(order, tid, target_files=[tid.lower()],
                   command=f"echo hello from {tid}; while [ ! -e {gate} ]; do sleep 0.05; done; echo bye from {tid}")
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/A") == "QUEUED")
    # `aipm run` in another terminal, as a person would have it.
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                            "--no-resource-monitoring"], stdout=subprocess.DEVNULL)

    def merged():
        return browser.execute_script(
            "return [...document.querySelectorAll('#merged .line')].map(l => l.dataset.task + ' ' + l.textContent)")

    wait_for(lambda: {"ORD/A Ahello from A", "ORD/B Bhello from B"} <= set(merged()))
    gate.touch()
    wait_for(lambda: {"ORD/A Abye from A", "ORD/B Bbye from B"} <= set(merged()))
    # A task's own log, on click.
    click(browser, "tr[data-task='ORD/A'] td.id a")
    wait_for(lambda: "bye from A" in browser.find_element("id", "tasklog").text)
    assert "from B" not in browser.find_element("id", "tasklog").text
    assert run.wait(timeout=120) == 0
    wait_for(lambda: row_status(browser, "ORD/B") == "DONE")


def test_cancel_from_the_page_stops_the_worker_group_and_retry_requeues(project, dashboard, browser):
    order = project.order()
    write_task(order, "A", command="sleep 60 & sleep 60; wait", target_files=["a"])
    browser.get(dashboard)
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    wait_for(lambda: row_status(browser, "ORD/A") == "IN_PROGRESS")
    click(browser, "tr[data-task='ORD/A'] button[data-action='cancel']")
    browser.switch_to.alert.accept()
    wait_for(lambda: task_statuses(order) == {"A": "CANCELLED"})
    wait_for(lambda: not group_alive(worker["pgid"]))
    wait_for(lambda: no_workers(project.root))
    wait_for(lambda: row_status(browser, "ORD/A") == "CANCELLED")
    click(browser, "tr[data-task='ORD/A'] button[data-action='retry']")
    wait_for(lambda: task_statuses(order) == {"A": "QUEUED"})
    wait_for(lambda: row_status(browser, "ORD/A") == "QUEUED")


def test_a_broken_task_file_leaves_the_other_tasks_reachable(project, dashboard, gate):
    """O1 has a file being edited; O2 (after it on the board) and O1's healthy task still answer."""
    first, second = project.order("O1"), project.order("O2")
    write_task(first, "T1", command="echo hello", target_files=["a"])
    write_task(second, "T1", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["b"])
    project.aipm("launch", "O2", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    (first / "T2.yaml").write_text("title: [unclosed\n")
    base, token = base_and_token(dashboard)
    for order in ("O1", "O2"):
        assert status_code(f"{base}/api/log?token={token}&order={order}&task=T1") == 200, order
    assert status_code(f"{base}/api/log?token={token}&order=O1&task=T2") == 200  # its file is there, broken
    assert status_code(f"{base}/api/log?token={token}&order=O2&task=nope") == 404
    headers = {"Content-Type": "application/json", "X-Aipm-Token": token}
    assert status_code(f"{base}/api/cancel", "POST", headers, b'{"order": "O2", "task": "T1"}') == 200
    wait_for(lambda: not group_alive(worker["pgid"]))
    assert task_statuses(second) == {"T1": "CANCELLED"}


def test_a_broken_task_file_leaves_its_siblings_on_the_board_with_the_error(project, dashboard, gate):
    """A task file being edited hid its whole order: the board gave the error and no task (its id the directory's
    name, not order.yaml's), so the task running beside it had no row and no cancel on the page. The tasks whose
    files load now stay, as they stand, with the error."""
    order = project.order("dir")
    (order / "order.yaml").write_text("id: ORDX\n")
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])
    write_task(order, "C", command="true", target_files=["c"], depends_on=["A"])
    project.aipm("launch", "ORDX", check=True)
    wait_for(lambda: task_statuses(order)["A"] == "IN_PROGRESS")
    (order / "B.yaml").write_text("priority: P9\n")
    base, token = base_and_token(dashboard)
    with urllib.request.urlopen(f"{base}/api/board?token={token}", timeout=60) as response:
        (shown,) = json.loads(response.read())["orders"]
    assert shown["id"] == "ORDX" and "B.yaml: priority: 'P9' is not one of" in shown["error"], shown
    assert [(t["id"], t["status"], t["waits_on"]) for t in shown["tasks"]] == [("A", "IN_PROGRESS", None),
                                                                               ("C", "QUEUED", None)]
    headers = {"Content-Type": "application/json", "X-Aipm-Token": token}
    assert status_code(f"{base}/api/cancel", "POST", headers, b'{"order": "ORDX", "task": "A"}') == 200
    wait_for(lambda: task_statuses(order)["A"] == "CANCELLED")


def test_the_page_reaches_an_order_by_its_id_and_refuses_an_id_two_orders_give(project, dashboard):
    """orders/CC gives the id AA, beside a directory orders/AA of the id ZZZ: the page asks for AA/c1, and the
    directory named AA was taken (no c1 there: 'no task'). And cancel or retry of an id that two orders give went
    to the first of them, where every CLI command refuses it."""
    orders = project.root / "orders"
    for name, given in (("AA", "ZZZ"), ("CC", "AA")):
        (orders / name).mkdir(parents=True)
        (orders / name / "order.yaml").write_text(f"id: {given}\n")
    write_task(orders / "CC", "c1", command="echo c1", target_files=["c"])
    base, token = base_and_token(dashboard)
    assert status_code(f"{base}/api/log?token={token}&order=AA&task=c1") == 200
    (orders / "DD").mkdir()
    (orders / "DD" / "order.yaml").write_text("id: AA\n")  # a copy of the order, say
    assert status_code(f"{base}/api/log?token={token}&order=AA&task=c1") == 404
    assert project.aipm("retry", "AA/c1").returncode == 2


def test_costs_show_as_status_shows_them_with_the_order_total_and_budget(project, dashboard, browser):
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.5\n")
    write_task(order, "A", prompt="@cost 0.0042")
    # Starts below the budget and ends far above it: aider takes no cap (claude would stop at its share).
    write_task(order, "B", prompt="@cost 1234.5", agent="aider")
    env = {"PATH": f"{REPO / 'tests' / 'agents'}{os.pathsep}{os.environ['PATH']}"}
    run = project.aipm("run", "ORD", env=env)
    assert run.returncode == 0 and "over budget" in run.stdout, run.stdout + run.stderr  # (both DONE: exit 0)
    base, token = base_and_token(dashboard)
    with urllib.request.urlopen(f"{base}/api/board?token={token}", timeout=30) as response:
        (board,) = json.load(response)["orders"]
    assert (board["cost_usd"], board["max_cost_usd"], board["budget_reached"]) == (1234.5042, 0.5, True)
    browser.get(dashboard)

    def cost_cells():
        return browser.execute_script(
            "return [...document.querySelectorAll('tr[data-task]')].map(r => r.querySelector('td.cost').textContent)")

    wait_for(lambda: cost_cells() == ["$0.0042", "$1,234.50"])  # as `aipm status` (budget.usd), not $0.00
    summary = browser.find_element("css selector", "section[data-order='ORD'] h2 .summary").text
    assert summary.endswith("DONE 2; cost $1,234.50 of max_cost_usd $0.5000 (reached)"), summary
    assert summary.split("; ", 1)[1] == project.aipm("status", "ORD").stdout.strip().splitlines()[-1].split("; ", 1)[1]


def test_the_server_says_whether_the_budget_is_reached_as_status_does(project, dashboard):
    """The page worked out "(reached)" itself from the cost and the limit; the board (and `status --json`) say
    it, from the budget the planner uses, so the page and `aipm status` cannot disagree."""
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.5\n")
    write_task(order, "A", command="true", status="DONE", cost_usd=0.2)
    write_task(order, "B", command="true")
    base, token = base_and_token(dashboard)

    def board():
        with urllib.request.urlopen(f"{base}/api/board?token={token}", timeout=30) as response:
            (shown,) = json.load(response)["orders"]
        return shown

    def line():
        return project.aipm("status", "ORD").stdout.strip().splitlines()[-1]

    for cost, reached in ((0.2, False), (0.3, True)):
        write_task(order, "B", command="true", status="DONE", cost_usd=cost)
        shown, status = board(), project.json("status", "ORD")
        assert (shown["max_cost_usd"], shown["budget_reached"]) == (0.5, reached)
        assert status["budget_reached"] is reached and line().endswith("(reached)") is reached
    write_task(order, "B", command="true")  # no recorded cost at all: unknown, and not reached
    (order / "A.yaml").write_text("id: A\ncommand: 'true'\n")
    shown, status = board(), project.json("status", "ORD")
    assert "cost_usd" not in shown and shown["budget_reached"] is False and status["budget_reached"] is False


def test_tries_and_reworks_show_as_status_shows_them(project, dashboard, browser):
    """Used of allowed, as `aipm status`: a task rejected after its one rework round shows 1/1 and 1/1 (the
    page showed its 2 attempts as `tries`; status showed `0/1` tries and `2/1` reworks)."""
    order = project.order()
    write_task(order, "T", max_attempts=1, max_rework=1, command="true", review="exit 1")
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 1
    base, token = base_and_token(dashboard)
    with urllib.request.urlopen(f"{base}/api/board?token={token}", timeout=30) as response:
        (row,) = json.load(response)["orders"][0]["tasks"]
    assert row == {**row, **{k: v for k, v in project.json("status", "ORD")["tasks"][0].items()}}
    assert (row["tries"], row["max_attempts"], row["reworks"], row["max_rework"]) == (1, 1, 1, 1)
    browser.get(dashboard)
    cells = "const r = document.querySelector(`tr[data-task='ORD/T']`); " \
            "return r && [r.querySelector('td.tries').textContent, r.querySelector('td.reworks').textContent]"
    wait_for(lambda: browser.execute_script(cells) == ["1/1", "1/1"])


def test_a_worker_lost_with_its_supervisor_reads_as_interrupted_and_says_what_to_do(project, dashboard):
    """Its supervisor and wrapper SIGKILLed, the task showed IN_PROGRESS in `status`, `status --json` and the
    dashboard, as if it ran, until someone thought of `aipm recover`; and `run` re-queued it without a word. Reads
    still write nothing: the file says IN_PROGRESS until a recovery."""
    order = project.order()
    write_task(order, "A", command='if [ "$AIPM_ATTEMPT" = 1 ]; then sleep 60; fi', target_files=["a.txt"])
    write_task(order, "B", command="true", target_files=["b.txt"], status="DONE")
    project.aipm("launch", "ORD", check=True)
    # Its pgid, not its pid: until the owner records the worker, `ps` names the owner as its pid (the launch's record
    # has no worker yet), and a worker recorded just after that read, its wrapper left alive, rightly ran on.
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    for pid in (worker["owner_pid"], worker["pid"]):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(worker["owner_pid"]) and not pid_alive(worker["pid"]))
    before = (snapshot(project.root), sorted(p.name for p in (state(project.root) / "workers" / "ORD").iterdir()))
    base, token = base_and_token(dashboard)
    with urllib.request.urlopen(f"{base}/api/board?token={token}", timeout=30) as response:
        (board,) = json.load(response)["orders"]
    shown = {t["id"]: t for t in board["tasks"]}["A"]
    (listed, _) = project.json("status", "ORD")["tasks"]
    table = project.aipm("status", "ORD", "--wide").stdout
    lost = "interrupted: worker lost with its supervisor; `aipm recover` re-queues it"
    assert (listed["status"], listed["reason"]) == (shown["status"], shown["reason"]) == ("INTERRUPTED", lost)
    assert board["summary"] == "DONE 1, INTERRUPTED 1" and table.strip().endswith("DONE 1, INTERRUPTED 1")
    assert any("INTERRUPTED" in line and lost in line for line in table.splitlines()), table
    assert task_statuses(order)["A"] == "IN_PROGRESS"  # shown as it is, written by no reader
    assert (snapshot(project.root), sorted(p.name for p in (state(project.root) / "workers" / "ORD").iterdir())) \
        == before
    run = project.aipm("run", "ORD", "--no-resource-monitoring")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    recovered = "recover  A: its worker was lost with its supervisor; re-queued, attempt not counted"
    starts = [i for i, line in enumerate(lines) if line.startswith("start")]
    assert recovered in lines and lines.index(recovered) < starts[0], run.stdout  # said before attempt 2 starts
    assert task_statuses(order) == {"A": "DONE", "B": "DONE"}


def test_an_open_page_hears_that_a_worker_was_lost_with_its_supervisor(project, dashboard):
    """/api/board and a reload showed the task INTERRUPTED, but an open page's event stream, woken only by file
    changes, never said so: a process that dies changes no file. The stream now holds the recorded processes'
    pidfds (the keep-alive is an hour: only that can wake it)."""
    write_task(project.order(), "A", command="sleep 60", target_files=["a.txt"])
    base, token = base_and_token(dashboard)
    events = urllib.request.urlopen(f"{base}/events?token={token}", timeout=60)
    next_board = boards_of(events)

    assert next_board()["orders"][0]["tasks"][0]["status"] == "QUEUED"  # connected
    project.aipm("launch", "ORD", check=True)
    # The worker's record (written twice: by the launch, then with the worker's pid by its owner) in a state
    # directory made meanwhile, outside the tree: the board must have the last one.
    # (its pgid: until the owner records the worker, the pid named is its owner's, as `ps` names it)
    while not (board := next_board())["workers"] or not all(w["pgid"] and w["alive"] for w in board["workers"]):
        pass
    (worker,) = board["workers"]
    os.kill(project.json("ps")["workers"][0]["owner_pid"], signal.SIGKILL)
    os.killpg(worker["pgid"], signal.SIGKILL)
    while (task := next_board()["orders"][0]["tasks"][0])["status"] != "INTERRUPTED":
        assert task["status"] == "IN_PROGRESS", task
    assert task["reason"] == "interrupted: worker lost with its supervisor; `aipm recover` re-queues it"
    events.close()


def test_a_task_starting_in_a_launch_round_is_not_taken_for_lost(project):
    """A launch round writes a task's IN_PROGRESS before its worker record, under the launch lock: a reader
    looking in between must wait for the round's end rather than call the starting task INTERRUPTED."""
    from aipm.liveness import process_ctime
    from aipm.record import Record
    from aipm.runtime import Runtime

    order = project.order()
    path = write_task(order, "A", command="true", status="IN_PROGRESS", attempts=1)
    rt = Runtime(project.root)
    with rt.launch_lock():  # the round: the status is written, the record not yet
        lock = os.stat(rt.state / "launch.lock").st_ino
        reader = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "status", "ORD",
                                   "--json"], stdout=subprocess.PIPE, text=True)
        # Blocked on the launch lock: /proc/locks lists a waiter ("->") on its inode.
        # (its pid too: another process may wait on a removed lock file whose inode number this one got since)
        wait_for(lambda: any("->" in line and f":{lock} " in line and f" {reader.pid} " in line
                             for line in open("/proc/locks")))
        rt.write_record(Record(order="ORD", order_dir=str(order), task="A", task_file=str(path), attempt=1,
                               targets=[], log=str(rt.log_path("ORD", "A", 1)),
                               exit_file=str(rt.exit_path("ORD", "A", 1)), started_at="now",
                               owner_pid=os.getpid(), owner_ctime=process_ctime(os.getpid())))
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and json.loads(out)["tasks"][0]["status"] == "IN_PROGRESS"
    rt.remove_record("ORD", "A")


def test_another_host_only_when_asked_and_with_a_warning(project):
    """127.0.0.2 is loopback too (nothing leaves the machine), but not the default: aipm warns."""
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "ui", "--host", "127.0.0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.2:"), url
        base, token = base_and_token(url)
        assert status_code(f"{base}/api/board?token={token}") == 200  # Host: 127.0.0.2:PORT, the address asked for
        assert status_code(f"{base}/api/board") == 403
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "warning: listening on 127.0.0.2" in err


def test_a_burst_of_log_lines_is_sent_only_as_far_as_the_page_keeps_them(project, dashboard, gate):
    """A worker printing 20,000 lines at once (one write): the merged log's message carried every one of them
    (a chatty agent's 18 MB transcript went out as 21 MB of events), though the page keeps its last 2,000."""
    burst = "import os; os.write(1, ''.join(f'line {n}\\n' for n in range(20000)).encode())"
    write_task(project.order(), "T", target_files=["t"],
               command=[sys.executable, "-c", f"{burst}\nimport os, time\nwhile not os.path.exists({str(gate)!r}): "
                        "time.sleep(0.05)"])
    base, token = base_and_token(dashboard)
    events = urllib.request.urlopen(f"{base}/events?token={token}", timeout=60)
    assert events.readline().startswith(b"event: board")  # connected, before the worker starts
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                            "--no-resource-monitoring"], stdout=subprocess.DEVNULL)
    sent = []
    while not any(item["line"] == "line 19999" for item in sent):
        line = events.readline()
        assert line, "the event stream ended"
        if line == b"event: log\n":
            sent = json.loads(events.readline()[len(b"data: "):])
            assert len(sent) <= 2000, len(sent)
    assert sent[0] == {"order": "", "task": "aipm",
                       "line": "[aipm ui] 18001 lines not shown here: each task's own log has them"}
    assert [item["line"] for item in sent[1:]] == [f"line {n}" for n in range(18001, 20000)]
    events.close()
    gate.touch()
    assert run.wait(timeout=120) == 0


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_a_bad_keepalive_is_one_line_and_exit_2(project, value):
    """AIPM_UI_KEEPALIVE=abc ended `aipm ui` with a ValueError traceback after it had bound its port."""
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), "ui"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, AIPM_UI_KEEPALIVE=value))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"aipm: error: AIPM_UI_KEEPALIVE: {value!r} is not a positive number of seconds\n"


def test_a_worker_that_ended_after_its_supervisor_died_reads_as_waiting_for_its_outcome(project):
    """Its owner killed, the worker went on and exited 0 (its exit file written): status said 'worker lost with
    its supervisor; `aipm recover` re-queues it', but recovery adopts such a worker and records its outcome (DONE),
    as run did: 'adopt    A (pid N): worker outlived its supervisor', 'finish   A → DONE (exit 0)'."""
    order = project.order()
    write_task(order, "A", command=f"{KILL_OWNER}; true", target_files=["a.txt"])
    project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
    (rec,) = wait_for(lambda: [w for w in project.json("ps")["workers"] if not w["alive"]])  # (its pid: none now)
    (listed,) = project.json("status", "ORD")["tasks"]
    assert (listed["status"], listed["reason"]) == (
        "INTERRUPTED", "interrupted: its supervisor died before recording how its worker ended; `aipm recover` "
        "records it"), rec
    assert task_statuses(order) == {"A": "IN_PROGRESS"}  # written by no reader
    # recover says what it recorded (it said "adopted", as of a worker that still ran)
    assert project.json("recover", "ORD")["recovered"] == [{"order": "ORD", "id": "A", "action": "recorded",
                                                            "status": "DONE", "exit_code": 0, "reason": "exit 0"}]
    wait_for(lambda: task_statuses(order) == {"A": "DONE"} and no_workers(project.root))


def test_an_outcome_its_owner_could_not_write_reads_as_waiting_for_it_not_as_a_dead_supervisor(project, gate):
    """Its task file saved invalid while it ran, the detached owner could not write the outcome and left it (exit
    file, record with no owner) to `aipm recover`, as its log said. `status` said `its supervisor died before
    recording how its worker ended`, and `ps` `gone (stale: aipm recover)`: no process had died."""
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a.txt"], priority="P1")
    project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
    wait_for(lambda: [w for w in project.json("ps")["workers"] if w["pid"]])
    path = order / "A.yaml"
    good = path.read_text()
    path.write_text(good.replace("priority: P1", "priority: P9"))
    gate.touch()
    (rec,) = wait_for(lambda: [w for w in project.json("ps")["workers"] if not w["alive"]])
    assert rec["state"] == "unrecorded", rec
    table = project.aipm("ps", env={"COLUMNS": "200"}, check=True).stdout
    assert "ended: its owner could not record its outcome (aipm recover records it)" in table, table
    path.write_text(good)  # fixed: IN_PROGRESS, as the start wrote it
    (listed,) = project.json("status", "ORD")["tasks"]
    assert (listed["status"], listed["reason"]) == (
        "INTERRUPTED", "interrupted: its outcome (exit 0) waits to be recorded: its owner could not write it (its "
        "task file did not validate); `aipm recover` records it"), listed
    assert project.json("recover", "ORD")["recovered"] == [{"order": "ORD", "id": "A", "action": "recorded",
                                                            "status": "DONE", "exit_code": 0, "reason": "exit 0"}]
    wait_for(lambda: task_statuses(order) == {"A": "DONE"} and no_workers(project.root))


def test_a_worker_whose_owning_aipm_died_reads_as_owner_gone_on_the_dashboard_as_in_ps(project, dashboard, browser,
                                                                                        gate):
    """Its owner killed, the worker runs on with nobody to record its end: `ps` says `unowned` ("alive, its owner
    gone (aipm recover adopts it)"), but the dashboard's workers list had no such state: it read as any live worker.
    The board now gives each worker `ps`'s state (the same function), and the page says it."""
    order = project.order()
    write_task(order, "A", command=f"{KILL_OWNER}; while [ ! -e {gate} ]; do sleep 0.05; done",
               target_files=["a.txt"])
    project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
    wait_for(lambda: [w for w in project.json("ps")["workers"] if w["state"] == "unowned"])
    base, token = base_and_token(dashboard)
    with urllib.request.urlopen(f"{base}/api/board?token={token}", timeout=60) as response:
        (worker,) = json.loads(response.read())["workers"]
    (listed,) = project.json("ps")["workers"]
    assert (worker["state"], worker["pid"]) == ("unowned", listed["pid"]), worker
    assert worker["state_text"] == "alive, its owner gone (aipm recover adopts it)"
    browser.get(dashboard)
    wait_for(lambda: "its owner gone" in browser.find_element("id", "workers").text)
    assert browser.find_element("id", "workers").text == (
        f"A (work, pid {listed['pid']}): alive, its owner gone (aipm recover adopts it)")
    gate.touch()
    project.aipm("recover", "ORD", check=True)
    wait_for(lambda: task_statuses(order) == {"A": "DONE"} and no_workers(project.root))


def _event_stream(url: str):
    """A page's event stream, opened and read up to its first message."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    client = socket.create_connection((parts.hostname, parts.port))
    client.sendall(f"GET /events?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    assert b"200" in client.recv(65536).split(b"\r\n", 1)[0]
    return client


def test_ctrl_c_with_pages_open_ends_their_streams_without_a_traceback(project):
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false", AIPM_UI_KEEPALIVE="3600")
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "ui", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip()
    clients = [_event_stream(url) for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    said = proc.stderr.read()
    assert "Traceback" not in said and "ERROR" not in said, said
    for client in clients:
        client.close()


def test_a_cancel_request_too_deep_or_too_long_is_a_400(project, dashboard):
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(dashboard)
    token = parts.query.split("token=")[1]
    for body in (b"[" * 100000 + b"]" * 100000, b'{"order": "' + b"x" * 100000 + b'", "task": "T"}'):
        request = urllib.request.Request(f"http://{parts.netloc}/api/cancel", data=body, method="POST",
                                         headers={"x-aipm-token": token, "content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 400


def test_an_empty_host_is_refused_not_every_interface(project):
    proc = project.aipm("ui", "--host", "")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--host: empty" in proc.stderr, proc.stderr


def test_an_address_that_cannot_be_had_is_one_line_without_the_exposure_warning(project):
    proc = project.aipm("ui", "--host", "999.1.1.1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--host 999.1.1.1" in proc.stderr, proc.stderr


def test_tasks_named_like_object_properties_are_drawn_with_the_other_orders(project, dashboard, browser):
    """Task ids are file names from the repository, and `constructor` or `toString` is a usable one: the graph
    looked them up in plain objects, found Object.prototype's members, threw, and the page drew no order at all."""
    first, second = project.order("O1"), project.order("O2")
    write_task(first, "constructor", command="true")
    write_task(first, "toString", command="true", depends_on=["constructor"])
    write_task(first, "A", command="true", depends_on=["toString"])
    write_task(second, "B", command="true")
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "O2/B") == "QUEUED")
    for key in ("O1/constructor", "O1/toString", "O1/A"):
        assert row_status(browser, key) == "QUEUED", key
    columns = browser.execute_script(
        "return [...document.querySelectorAll(\"section[data-order='O1'] svg rect\")].map(r => +r.getAttribute('x'))")
    assert sorted(columns) == [4, 164, 324]  # a chain of three: a column each


def test_only_the_pages_own_script_may_run(project, dashboard, browser):
    """The page puts every text as text (no innerHTML); should a later change slip, markup from a task file or a
    log line must still run nothing: the policy names the page's one script by its hash ('unsafe-inline' let an
    injected onerror= handler or <script> run)."""
    write_task(project.order(), "A", command="true")
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/A") == "QUEUED")  # the page's own script ran
    browser.execute_script("""
        const box = document.createElement('div');
        box.innerHTML = '<img src="data:," onerror="window.injected = 1"><svg onload="window.injected = 2"></svg>';
        document.body.append(box);
        const script = document.createElement('script');
        script.textContent = 'window.injected = 3';
        document.body.append(script);""")
    import time
    time.sleep(1)  # the image's error and the svg's load fire at once; give them a moment
    assert browser.execute_script("return window.injected") is None


def test_a_tasks_log_sends_its_newest_attempts_only_as_far_as_a_budget(project, dashboard):
    """Each attempt's log was cut to its last 256 KiB, but every attempt's was sent: a worker that left thousands
    of sparse files named A.<n>.log (no disk used) had one click on its task read gigabytes into the server's
    memory. The newest attempts come first to the budget; the response says how many older ones it left out."""
    write_task(project.order(), "A", command="true")
    logs = project.root / ".aipm" / "logs" / "ORD"
    logs.mkdir(parents=True)
    for attempt in range(1, 41):
        with open(logs / f"A.{attempt}.log", "wb") as handle:
            handle.truncate(1 << 20)
    base, token = base_and_token(dashboard)
    with urllib.request.urlopen(f"{base}/api/log?token={token}&order=ORD&task=A", timeout=60) as response:
        body = response.read()
    shown = json.loads(body)
    assert len(body) < 8 << 20, len(body)  # 1 MiB of NULs, as JSON writes them (\u0000): 6 MiB
    assert [log["name"] for log in shown["logs"]] == [f"A.{n}.log" for n in range(37, 41)]
    assert shown["omitted"] == 36


def test_a_directory_named_in_bytes_that_are_not_utf8_leaves_the_board_readable(project, dashboard):
    """A directory under orders/ whose name is not UTF-8 (a worker's `mkdir $'orders/B\\xffD'`, an archive's
    Latin-1 names) is read as surrogates, which Starlette's JSON could not encode: /api/board was a 500 and a
    traceback, for every order. It shows as the event stream shows it, the name escaped, with its error."""
    write_task(project.order(), "A", command="true")
    odd = os.path.join(os.fsencode(project.root / "orders"), b"B\xffD")
    os.mkdir(odd)
    write_task(project.root / "orders" / os.fsdecode(odd), "X", command="true")
    base, token = base_and_token(dashboard)
    try:
        with urllib.request.urlopen(f"{base}/api/board?token={token}", timeout=60) as response:
            board = json.loads(response.read())
        shown = {order["id"]: order for order in board["orders"]}
        assert [t["status"] for t in shown["ORD"]["tasks"]] == ["QUEUED"]
        assert "not a usable order id" in shown["B\udcffD"]["error"]
        # A request naming such an order is refused in JSON too (its error quotes the name).
        body = json.dumps({"order": "B\udcffD", "task": "X"}).encode()
        assert status_code(f"{base}/api/cancel", "POST",
                           {"Content-Type": "application/json", "X-Aipm-Token": token}, body) == 409
    finally:
        shutil.rmtree(odd)  # conftest's clean-up takes every directory for a project root, and no root can be so named


def test_seven_tabs_each_load_and_fetch_a_log_and_hear_changes(project, dashboard, browser, gate):
    """A browser opens at most six connections to one server, and each tab's event stream held one for good: the
    seventh tab never loaded, and in six a click on a task id (its log) or a cancel waited for ever. One tab now
    holds the stream and passes it on to the others; when it closes, another takes it over."""
    order = project.order()
    write_task(order, "W", target_files=["w"], command=f"echo hello from W; while [ ! -e {gate} ]; do sleep 0.05; done")
    project.aipm("launch", "ORD", check=True)
    waited = browser.timeouts.page_load
    browser.set_page_load_timeout(60)  # a tab that cannot load fails the test, not the rest of the module's
    tabs = []
    try:
        for n in range(7):
            if n:
                browser.switch_to.new_window("tab")
            tabs.append(browser.current_window_handle)
            browser.get(dashboard)
            wait_for(lambda: row_status(browser, "ORD/W") == "IN_PROGRESS")
        # The last tab opened, fed by the first: the merged log's line once, and a task's log on click.
        wait_for(lambda: browser.find_element("id", "merged").text.count("hello from W") == 1)
        click(browser, "tr[data-task='ORD/W'] td.id a")
        wait_for(lambda: "hello from W" in browser.find_element("id", "tasklog").text)
        write_task(order, "B", command="true")
        browser.switch_to.window(tabs[3])
        wait_for(lambda: row_status(browser, "ORD/B") == "QUEUED")
        browser.switch_to.window(tabs[0])  # the tab that holds the stream
        browser.close()
        browser.switch_to.window(tabs[5])
        write_task(order, "C", command="true")
        wait_for(lambda: row_status(browser, "ORD/C") == "QUEUED")
    finally:
        for handle in tabs[1:]:  # the module's browser keeps one window
            if len(browser.window_handles) > 1:
                browser.switch_to.window(handle)
                browser.close()
        browser.switch_to.window(browser.window_handles[0])
        browser.set_page_load_timeout(waited)
    gate.touch()
    wait_for(lambda: no_workers(project.root))


def test_a_log_that_comes_after_another_task_was_clicked_is_not_shown_under_its_name(project, dashboard, browser):
    """Click A (a big log, slow to come), then B: A's log, coming last, replaced B's under the name ORD/B."""
    order = project.order()
    logs = project.root / ".aipm" / "logs" / "ORD"
    logs.mkdir(parents=True)
    for tid in ("A", "B"):
        write_task(order, tid, command="true")
        (logs / f"{tid}.1.log").write_text(f"the log of {tid}\n")
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/B") == "QUEUED")
    # A's answer is held until B's is shown: the order a slow log and a quick one come in.
    browser.execute_script("""
        const real = window.fetch;
        let release;
        const held = new Promise(resolve => release = resolve);
        window.releaseA = release;
        window.fetch = (url, ...rest) => String(url).includes("task=A") ? held.then(() => real(url, ...rest))
                                                                        : real(url, ...rest);
        showLog("ORD", "A").then(() => window.aDone = true);""")
    click(browser, "tr[data-task='ORD/B'] td.id a")
    wait_for(lambda: "the log of B" in browser.find_element("id", "tasklog").text)
    browser.execute_script("window.releaseA()")
    wait_for(lambda: browser.execute_script("return window.aDone"))
    assert browser.find_element("id", "tasklog-name").text == "ORD/B"
    assert "the log of B" in browser.find_element("id", "tasklog").text
    assert "the log of A" not in browser.find_element("id", "tasklog").text


def test_one_change_is_one_read_of_the_board_however_many_pages_are_open(project, dashboard):
    """Each open page's stream read the whole board for itself at every change: 30 pages (or scripts following
    /events) and 80 tasks made each change 0.7 s of CPU. Counted here as the dashboard's opens of a task file
    (inotify IN_OPEN): one change, seen by one page and by six, is as many reads."""
    from aipm.inotify import DirWatch

    order = project.order()
    write_task(order, "A", command="true")
    stage = project.root / "stage"  # no directory the dashboard watches: a file made there is no change
    stage.mkdir()
    base, token = base_and_token(dashboard)
    opens = DirWatch.open(str(order), 0x020)  # IN_OPEN

    def reads_of_a_change(pages: int, task: str) -> int:
        streams = [urllib.request.urlopen(f"{base}/events?token={token}", timeout=60) for _ in range(pages)]
        for events in streams:  # each has its first board, read before the change
            assert events.readline() == b"event: board\n"
            events.readline()
        opens.changed()
        new = write_task(stage, task, command="true")  # moved in: one event, one change
        os.rename(new, order / new.name)
        for events in streams:
            while f'"id":"{task}"'.encode() not in events.readline():
                pass
            events.close()
        return sum(name == "A.yaml" for _, name in opens.events())

    try:
        alone = reads_of_a_change(1, "B")
        assert alone >= 1
        assert reads_of_a_change(6, "C") == alone
    finally:
        opens.close()


def test_ctrl_c_while_a_cancel_stops_its_worker_lets_the_cancel_answer(project):
    """A cancel waits for its worker's group to stop (SIGKILL 5 s after a SIGTERM it ignores): Ctrl-C meanwhile cut
    the request after a 1 s grace, with a CancelledError traceback on the terminal and a 500 for the page, though
    the cancel went on to the end."""
    import threading

    order = project.order()
    write_task(order, "A", command="trap '' TERM; while true; do sleep 0.05; done", target_files=["a"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false", AIPM_UI_KEEPALIVE="3600")
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "ui", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base, token = base_and_token(proc.stdout.readline().strip())
    answer = []
    request = threading.Thread(target=lambda: answer.append(status_code(
        f"{base}/api/cancel", "POST", {"Content-Type": "application/json", "X-Aipm-Token": token},
        b'{"order": "ORD", "task": "A"}')))
    request.start()
    wait_for(lambda: "stopping the process group" in open(worker["log"]).read())  # the SIGTERM is sent
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    request.join()
    said = proc.stderr.read()
    assert "Traceback" not in said and "ERROR" not in said, said
    assert answer == [200]
    assert task_statuses(order) == {"A": "CANCELLED"} and not group_alive(worker["pgid"])


def test_a_page_whose_server_was_replaced_says_it_has_stopped(project, browser):
    """A page of a stopped `aipm ui` whose port a new one took (a new token: 403) said 'reconnecting…' for ever,
    though the browser had given its stream up."""
    import socket

    with socket.socket() as probe:  # a port free now, for both servers in turn
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false", AIPM_UI_KEEPALIVE="3600")
    servers = []

    def start():
        servers.append(subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "ui", "--port",
                                         port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        return servers[-1].stdout.readline().strip()

    try:
        browser.get(start())
        wait_for(lambda: browser.find_element("id", "conn").text == "live")
        servers[0].send_signal(signal.SIGINT)
        assert servers[0].wait(timeout=60) == 130
        assert start()
        wait_for(lambda: browser.find_element("id", "conn").text.startswith("stopped"))
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)


def test_a_log_of_many_short_lines_puts_in_only_the_lines_the_panel_keeps(project, dashboard, browser):
    """A task's log of 64,000 short lines was put in whole and then cut one line at a time, counting the panel's
    lines at each cut: the page was held for 9 s (a log of a million empty lines, for minutes). Counted here as
    the lines added to the panel, which keeps 2,000."""
    write_task(project.order(), "A", command="true")
    logs = project.root / ".aipm" / "logs" / "ORD"
    logs.mkdir(parents=True)
    (logs / "A.1.log").write_text("".join(f"{n}\n" for n in range(64000)))
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/A") == "QUEUED")
    added = browser.execute_async_script("""
        const done = arguments[0], pre = document.getElementById("tasklog");
        let added = 0;
        new MutationObserver(changes => changes.forEach(c => added += c.addedNodes.length))
          .observe(pre, {childList: true});
        showLog("ORD", "A").then(() => setTimeout(() => done(added)));  // (the observer reports after a task)""")
    lines = browser.find_element("id", "tasklog").text.splitlines()
    assert lines[-1] == "63999" and len(lines) == 2000
    assert added <= 2001, added  # the log's name, and the lines kept


def test_connections_that_send_no_request_do_not_make_the_dashboard_unreachable(project):
    """1,100 connections that sent nothing, under `ulimit -n 1024`, were kept for ever: the dashboard answered
    nothing more, and asyncio logged a traceback every second for the accept it could not make."""
    import resource
    import socket

    write_task(project.order(), "A", command="true")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this test holds 1,100 connections; `ulimit -Hn` is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    proc, url = started_ui(project, fd_limit=1024)
    base, token = base_and_token(url)
    port = int(base.rsplit(":", 1)[1])
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        assert status_code(f"{base}/api/board?token={token}") == 200
    finally:
        for client in idle:
            client.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    said = proc.stderr.read()
    assert "Traceback" not in said and said.count("\n") <= 2, said
    assert all(line.startswith("aipm ui: ") for line in said.splitlines()), said


def test_a_connection_that_sends_no_whole_request_is_closed(project, dashboard):
    """One that sent nothing, or half a request's head, was kept open for ever (uvicorn times a connection out
    only after an answer)."""
    import socket

    base, _ = base_and_token(dashboard)
    port = int(base.rsplit(":", 1)[1])
    silent = socket.create_connection(("127.0.0.1", port), timeout=60)
    half = socket.create_connection(("127.0.0.1", port), timeout=60)
    half.sendall(f"GET /api/board HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    for client in (silent, half):
        assert client.recv(1) == b""  # closed by the server (a timeout here raises)
        client.close()


def test_a_cancel_from_the_page_shows_what_the_person_must_know_besides(project, dashboard, browser, gate):
    """The server answers a cancel with a note when there is more to know (here: the run that owns the task is
    stopped, Ctrl-Z, and records the worker's end only once it goes on); the page showed nothing of it."""
    from conftest import stop_outside_a_round

    running = project.root / "running"
    write_task(project.order(), "A", target_files=["a"],
               command=f"touch {running}; while [ ! -e {gate} ]; do sleep 0.05; done")
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                            "--no-resource-monitoring"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(running.exists)
        stop_outside_a_round(project, run)
        browser.get(dashboard)
        wait_for(lambda: row_status(browser, "ORD/A") == "IN_PROGRESS")
        click(browser, "tr[data-task='ORD/A'] button[data-action='cancel']")
        browser.switch_to.alert.accept()

        def note():
            from selenium.common.exceptions import NoAlertPresentException
            try:
                return browser.switch_to.alert.text
            except NoAlertPresentException:
                return None

        said = wait_for(note)
        browser.switch_to.alert.accept()
        assert said.startswith("ORD/A: its worker has ended") and f"(aipm pid {run.pid}), which is stopped" in said
    finally:
        run.send_signal(signal.SIGCONT)
    run.wait(timeout=60)
    assert task_statuses(project.order()) == {"A": "CANCELLED"}


def test_requests_that_are_not_http_are_said_once_not_once_each(project):
    """Each connection that sent something other than HTTP (a port scanner, a stray client) was a line of uvicorn's
    on the dashboard's stderr: 20 of them, 20 lines."""
    import socket

    proc, url = started_ui(project)
    base, token = base_and_token(url)
    port = int(base.rsplit(":", 1)[1])
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                client.sendall(b"GARBAGE\r\n\r\n")
                assert client.recv(100).startswith(b"HTTP/1.1 400")
        assert status_code(f"{base}/api/board?token={token}") == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    said = proc.stderr.read()
    assert said.count("Invalid HTTP request") == 1 and said.count("\n") == 1, said


def _cancel_a_from_the_page(base: str, token: str, action: str = "cancel") -> tuple[int, dict]:
    """POST the page's cancel (or another `action`) of ORD/A: (status, answer)."""
    request = urllib.request.Request(f"{base}/api/{action}", method="POST", data=b'{"order": "ORD", "task": "A"}',
                                     headers={"X-Aipm-Token": token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def test_a_cancel_from_the_page_held_up_by_a_stopped_round_says_who_holds_it(project, dashboard):
    """A cancel from the page behind an `aipm run` stopped (Ctrl-Z) inside a round waited for the launch lock as
    long as that run stayed stopped: the page's request hung, and only the server's stderr said why. Now the page
    is answered who holds it, and the cancel is made once it goes on."""
    from conftest import stopped_launch_lock_holder

    write_task(project.order(), "A", command="true")
    base, token = base_and_token(dashboard)
    holder = stopped_launch_lock_holder(project)
    try:
        answer = _cancel_a_from_the_page(base, token)
        assert answer[0] == 202 and f"held by pid {holder.pid} (" in answer[1]["note"], answer
        assert answer[1]["note"].endswith(f"`kill -CONT {holder.pid}`, lets it go on; the cancel is made once it "
                                          "goes on (if this dashboard still runs)"), answer
        assert task_statuses(project.order()) == {"A": "QUEUED"}
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.wait(timeout=60)
    wait_for(lambda: task_statuses(project.order()) == {"A": "CANCELLED"})
    holder = stopped_launch_lock_holder(project)
    try:  # and a retry's, named so (`the _retry is made`: its function's name)
        answer = _cancel_a_from_the_page(base, token, "retry")
        assert answer[0] == 202 and answer[1]["note"].endswith("the retry is made once it goes on (if this dashboard "
                                                               "still runs)"), answer
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.wait(timeout=60)
    wait_for(lambda: task_statuses(project.order()) == {"A": "QUEUED"})


def test_ctrl_c_ends_the_dashboard_though_a_cancel_still_waits_for_a_stopped_round(project):
    """A cancel from the page held up by a stopped round waited in the server's thread pool, which Ctrl-C waited for:
    `aipm ui` did not end until that round went on. It ends now, and the cancel, never made, changed nothing."""
    from conftest import stopped_launch_lock_holder

    write_task(project.order(), "A", command="true")
    proc, url = started_ui(project)
    base, token = base_and_token(url)
    holder = stopped_launch_lock_holder(project)
    try:
        assert _cancel_a_from_the_page(base, token)[0] == 202
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # (the round is still stopped)
        said = proc.stderr.read()
        assert "Traceback" not in said and "ERROR" not in said, said
    finally:
        holder.kill()
        holder.wait(timeout=60)
        proc.kill()
        proc.wait(timeout=60)
    assert task_statuses(project.order()) == {"A": "QUEUED"}


def _rows(driver, order_id):
    """The task keys of the order's table rows, top to bottom."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`section[data-order='${arguments[0]}'] tr[data-task]`)]"
        ".map(r => r.dataset.task)", order_id)


def _boxes(driver, order_id):
    """The order's graph boxes: task id -> [label, status (its title), fill, x]."""
    return driver.execute_script("""
        const out = {};
        for (const rect of document.querySelectorAll(`section[data-order='${arguments[0]}'] svg rect`)) {
          const text = rect.nextElementSibling, [id, status] = text.lastChild.textContent.split(": ");
          out[id] = [text.firstChild.textContent, status, rect.getAttribute("fill"), +rect.getAttribute("x")];
        }
        return out;""", order_id)


def test_a_big_order_shows_each_change_in_place_and_keeps_the_rows_that_did_not_change(project, dashboard, browser):
    """The page redraws only the rows of the tasks that changed and lays the graph out again only when its shape
    changed (a redraw of 3,000 tasks took a second a change): a status change, a removed task, an added one and a
    new priority must each show as a reload would show them, with the untouched rows the same nodes."""
    order = project.order()
    ids = [f"T{i:02d}" for i in range(40)]
    for i, tid in enumerate(ids):  # chains of ten
        write_task(order, tid, command="true", **({"depends_on": [ids[i - 1]]} if i % 10 else {}))
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/T39") == "QUEUED")
    assert _rows(browser, "ORD") == [f"ORD/{tid}" for tid in ids]
    browser.execute_script("document.querySelectorAll('tr[data-task], svg').forEach(n => n.kept = true)")

    def kept(css):
        return browser.execute_script("return document.querySelector(arguments[0]).kept === true", css)

    write_task(order, "T15", command="true", depends_on=["T14"], status="CANCELLED")
    wait_for(lambda: row_status(browser, "ORD/T15") == "CANCELLED")
    assert browser.execute_script(
        "return document.querySelector(\"tr[data-task='ORD/T15'] button\").dataset.action") == "retry"
    wait_for(lambda: _boxes(browser, "ORD")["T15"][1:3] == ["CANCELLED", "#eaeef2"])
    assert _boxes(browser, "ORD")["T05"][1:3] == ["QUEUED", "#ddf4ff"]
    assert kept("tr[data-task='ORD/T05']") and kept("section[data-order='ORD'] svg")  # no layout again
    assert not kept("tr[data-task='ORD/T15']")

    for gone in ("T29", "T39"):  # the ends of two chains: from the middle of the table and from its end
        (order / f"{gone}.yaml").unlink()
    wait_for(lambda: _rows(browser, "ORD")[-2:] == ["ORD/T37", "ORD/T38"] and "ORD/T29" not in _rows(browser, "ORD"))
    assert not {"T29", "T39"} & set(_boxes(browser, "ORD"))
    assert kept("tr[data-task='ORD/T28']") and kept("tr[data-task='ORD/T30']")

    write_task(order, "T30", command="true", priority="P0")  # a new label: the graph's shape changed
    wait_for(lambda: _boxes(browser, "ORD")["T30"][0].startswith("P0"))
    write_task(order, "T15a", command="true", depends_on=["T15"])
    wait_for(lambda: _rows(browser, "ORD") == [f"ORD/{tid}" for tid in sorted([*ids, "T15a"])
                                               if tid not in ("T29", "T39")])
    boxes = _boxes(browser, "ORD")
    assert boxes["T15a"][1] == "QUEUED" and boxes["T15a"][3] > boxes["T15"][3]  # a column right of T15
    assert boxes["T15"][1:3] == ["CANCELLED", "#eaeef2"]  # the new layout's colours are the board's
    assert row_status(browser, "ORD/T15") == "CANCELLED"


def test_an_order_that_breaks_and_is_mended_shows_its_tasks_as_they_are_now(project, dashboard, browser):
    """The page keeps each order's rows between boards: an order shown as an error in between must come back with
    the tasks as they stand, not the rows it had before; an order that goes leaves the page."""
    order, other = project.order(), project.order("O2")
    write_task(order, "A", command="true")
    write_task(order, "B", command="true")
    write_task(other, "C", command="true")
    browser.get(dashboard)
    wait_for(lambda: row_status(browser, "ORD/B") == "QUEUED" and row_status(browser, "O2/C") == "QUEUED")
    (order / "B.yaml").write_text("id: B\ncommand: [unclosed\n")
    wait_for(lambda: browser.execute_script(
        "return !!document.querySelector(\"section[data-order='ORD'] .error\")"))
    assert row_status(browser, "ORD/A") == "QUEUED" and row_status(browser, "ORD/B") is None  # A's file loads
    assert not browser.execute_script("return !!document.querySelector(\"section[data-order='ORD'] svg\")")
    write_task(order, "B", command="true", status="CANCELLED")
    (order / "A.yaml").unlink()
    wait_for(lambda: row_status(browser, "ORD/B") == "CANCELLED")
    assert _rows(browser, "ORD") == ["ORD/B"] and list(_boxes(browser, "ORD")) == ["B"]
    assert not browser.execute_script("return !!document.querySelector(\"section[data-order='ORD'] .error\")")
    shutil.rmtree(other)
    wait_for(lambda: not browser.execute_script("return !!document.querySelector(\"section[data-order='O2']\")"))
    assert row_status(browser, "ORD/B") == "CANCELLED"


def test_the_page_is_sent_only_the_tasks_that_changed_after_its_first_board(project, dashboard):
    """Each change sent the whole board (1 MB for 3,000 tasks) however little of it changed. The page's stream
    (patches=1) now gets a whole board first, as any reconnected one does, then each unchanged task as its id alone;
    a stream without patches=1 (a script following /events) still gets whole boards."""
    order = project.order()
    for tid in ("A", "B", "C"):
        write_task(order, tid, command="true")
    base, token = base_and_token(dashboard)

    def events(query):
        stream = urllib.request.urlopen(f"{base}/events?token={token}{query}", timeout=60)

        def next_message():
            while not (line := stream.readline()).startswith(b"event: "):
                assert line, "the event stream ended"
            return line[len(b"event: "):].strip().decode(), json.loads(stream.readline()[len(b"data: "):])
        return stream, next_message

    page, page_heard = events("&patches=1")
    script, script_heard = events("")
    for heard in (page_heard, script_heard):
        kind, board = heard()
        assert kind == "board" and [t["status"] for t in board["orders"][0]["tasks"]] == ["QUEUED"] * 3
    tasks = {t["id"]: t for t in board["orders"][0]["tasks"]}
    for tid, status in (("B", "CANCELLED"), ("D", "QUEUED")):  # whole files at once: no half-written one is read
        write_task(project.root, "new", command="true", status=status, id=tid).replace(order / f"{tid}.yaml")
    while "D" not in tasks or tasks["B"]["status"] != "CANCELLED":
        kind, board = page_heard()
        rows = board["orders"][0]["tasks"]
        assert kind == "patch" and rows[0] == "A"  # A did not change: its id alone
        tasks = dict((row, tasks[row]) if isinstance(row, str) else (row["id"], row) for row in rows)
    assert list(tasks) == ["A", "B", "C", "D"] and tasks["D"]["status"] == "QUEUED"
    while len((said := script_heard())[1]["orders"][0]["tasks"]) < 4 or said[1]["orders"][0]["tasks"][1][
            "status"] != "CANCELLED":
        assert said[0] == "board"
    assert said[0] == "board" and [t["status"] for t in said[1]["orders"][0]["tasks"]] == [
        "QUEUED", "CANCELLED", "QUEUED", "QUEUED"]
    page.close()
    script.close()


def test_the_page_says_a_tasks_log_was_removed_since_it_ran_not_that_it_never_ran(project, dashboard):
    """A DONE task whose log a worker's `rm -rf .aipm` took showed "(no log yet: it has not run)"; the page now
    says what `aipm logs` says (logbook.no_log): removed since it ran, with what its file says."""
    order = project.order()
    write_task(order, "RAN", command="true")
    write_task(order, "NOT", command="true")  # (`exec` runs RAN alone)
    assert project.aipm("exec", "ORD/RAN").returncode == 0
    shutil.rmtree(project.root / ".aipm" / "logs")
    base, token = base_and_token(dashboard)

    def none(task):
        with urllib.request.urlopen(f"{base}/api/log?token={token}&order=ORD&task={task}", timeout=60) as response:
            return json.loads(response.read())["none"]

    assert none("RAN").startswith("no log for ORD/RAN: removed since it ran (its file says DONE, attempts 1, ")
    assert none("NOT") == "no log for ORD/NOT yet (it has not run)"


def test_a_retry_from_the_dashboard_of_a_lost_attempt_says_what_it_had_come_to(project, dashboard):
    """`aipm retry` of a task whose worker was lost says what the attempt it replaces had come to (its exit code,
    which a recover would have recorded); the dashboard's retry answered `ok` alone, the note in the log only."""
    from test_hostile_workers import _ended_with_its_owner_dead

    order = _ended_with_its_owner_dead(project, 3)
    base, token = base_and_token(dashboard)
    request = urllib.request.Request(f"{base}/api/retry", method="POST", data=b'{"order": "ORD", "task": "A"}',
                                     headers={"Content-Type": "application/json", "X-Aipm-Token": token})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert answer["ok"] and answer.get("note", "").startswith("attempt 1 had ended (exit 3) after its owner died"), \
        answer
    assert task_statuses(order) == {"A": "QUEUED"}


def test_an_orders_standby_owner_shows_as_ps_shows_it_and_goes_when_it_is_killed(project, dashboard, browser, gate):
    """`ps` listed an order's standby owner (a launch that found no free slot leaves one), the dashboard did not: the
    page said "none running" while a process waited to start B1. The board lists it, an open page hears it come, and
    hears it go when it is SIGKILLed (which changes no file: the hub holds its pidfd)."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    for name in ("A1", "A2"):
        write_task(project.order("A"), name, command=f"while [ ! -e {gate} ]; do sleep 0.05; done",
                   target_files=[name])
    write_task(project.order("B"), "B1", command="true", target_files=["B1"])
    base, token = base_and_token(dashboard)
    events = urllib.request.urlopen(f"{base}/events?token={token}", timeout=60)
    next_board = boards_of(events)

    assert next_board()["standby"] == []
    project.aipm("launch", "A", "--no-resource-monitoring", check=True)
    project.aipm("launch", "B", "--no-resource-monitoring", check=True)
    (listed,) = project.json("ps")["standby"]
    while (board := next_board())["standby"] != [listed]:
        assert board["standby"] == [], board["standby"]
    browser.get(dashboard)
    said = f"standby B (pid {listed['pid']}): waits for room to start B1"
    wait_for(lambda: said in browser.find_element("id", "workers").text)
    os.kill(listed["pid"], signal.SIGKILL)
    while next_board()["standby"]:
        pass
    wait_for(lambda: "standby" not in browser.find_element("id", "workers").text)
    events.close()
    gate.touch()
    wait_for(lambda: no_workers(project.root))
