"""Issue 17 (B3): the parse cache. Whatever the cache holds, loading returns what parsing the files returns."""

import json
import marshal
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from aipm import parsecache, store
from aipm.errors import ValidationError
from aipm.plan import plan
from aipm.store import load_order
from conftest import write_task


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A project root with a runtime directory, in a process that may write the cache. RACY_NS is 0 so files
    written a moment ago count as old enough (the CLI test below waits for the real window instead)."""
    (tmp_path / ".aipm").mkdir()
    monkeypatch.setattr(parsecache, "_writable", True)
    monkeypatch.setattr(parsecache, "RACY_NS", 0)
    return tmp_path


@pytest.fixture
def parses(monkeypatch):
    """The names of the task files parsed (not recalled) from now on."""
    seen = []
    real = store.load_task

    def spy(path, *args):
        seen.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(store, "load_task", spy)
    return seen


def cache_files(root: Path) -> list[Path]:
    return sorted((root / ".aipm" / "cache").glob("*.tasks"))


def cache_name(order: Path) -> str:
    real = os.path.realpath(order)
    return f"{os.path.basename(real)}-{zlib.crc32(real.encode()):08x}.tasks"


def make_order(root: Path, n: int = 4) -> Path:
    order = root / "orders" / "ORD"
    for i in range(n):
        write_task(order, f"T{i}", command="true", target_files=[f"src/m{i}.py", "docs/"],
                   depends_on=[f"T{i - 1}"] if i else [], priority="P2" if i % 2 else "P1")
    time.sleep(0.01)  # past the file system's timestamp tick, so the files are older than the load
    return order


def test_a_second_load_parses_nothing_and_returns_the_same_order(cached, parses):
    order = make_order(cached)
    first = load_order(order, cached)
    assert sorted(parses) == ["T0.yaml", "T1.yaml", "T2.yaml", "T3.yaml"] and len(cache_files(cached)) == 1
    parses.clear()
    second = load_order(order, cached)
    assert parses == []
    assert second.tasks == first.tasks and list(second.tasks) == list(first.tasks)
    assert second.tasks == load_order(order, None).tasks  # and what parsing without any cache gives


def test_an_edit_that_keeps_size_and_mtime_is_still_seen(cached, parses):
    """The key holds ctime, which no tool can set back: restoring mtime (and size) does not hide an edit."""
    order = make_order(cached)
    load_order(order, cached)
    path = order / "T1.yaml"
    info = path.stat()
    text = path.read_text()
    assert "P2" in text
    path.write_text(text.replace("P2", "P3"))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)
    parses.clear()
    assert load_order(order, cached).tasks["T1"].priority.value == "P3"
    assert parses == ["T1.yaml"]


def test_a_replaced_or_deleted_file_is_seen(cached, parses):
    order = make_order(cached)
    load_order(order, cached)
    (order / "T3.yaml").unlink()
    tmp = order / ".T2.new"
    tmp.write_text((order / "T2.yaml").read_text().replace("command: 'true'", "command: 'false'"))
    os.replace(tmp, order / "T2.yaml")
    parses.clear()
    loaded = load_order(order, cached)
    assert sorted(loaded.tasks) == ["T0", "T1", "T2"] and loaded.tasks["T2"].command == "false"
    assert parses == ["T2.yaml"]


def test_a_file_changed_within_the_racy_window_is_not_remembered(cached, parses, monkeypatch):
    monkeypatch.setattr(parsecache, "RACY_NS", 3600 * 10**9)  # every file is "just written"
    order = make_order(cached)
    load_order(order, cached)
    load_order(order, cached)
    assert sorted(parses) == sorted(["T0.yaml", "T1.yaml", "T2.yaml", "T3.yaml"] * 2)


def test_a_file_that_became_invalid_is_never_hidden(cached):
    order = make_order(cached)
    load_order(order, cached)
    path = order / "T2.yaml"
    path.write_text(path.read_text().replace("priority: P1", "priority: P9"))
    with pytest.raises(ValidationError, match="T2.yaml: priority: 'P9' is not one of"):
        load_order(order, cached)


def test_a_target_that_now_leads_outside_the_root_is_refused_although_the_file_is_unchanged(cached, tmp_path_factory):
    """Targets depend on the tree, not the file: they are normalised again on every load."""
    order = make_order(cached)
    load_order(order, cached)
    outside = tmp_path_factory.mktemp("elsewhere")
    (cached / "src").symlink_to(outside)
    with pytest.raises(ValidationError, match="T0.yaml: target_files: 'src/m0.py' is a symlink that leads outside"):
        load_order(order, cached)


def test_a_task_file_replaced_by_a_symlink_is_refused_as_without_the_cache(cached):
    order = make_order(cached)
    load_order(order, cached)
    copy = cached / "T3.copy"
    copy.write_text((order / "T3.yaml").read_text())
    (order / "T3.yaml").unlink()
    (order / "T3.yaml").symlink_to(copy)
    with pytest.raises(ValidationError, match="T3.yaml: is a symlink"):
        load_order(order, cached)


def test_links_between_tasks_are_checked_again(cached):
    order = make_order(cached)
    load_order(order, cached)
    (order / "T0.yaml").unlink()
    with pytest.raises(ValidationError, match="T1.yaml: depends_on: 'T0' is not a task of order ORD"):
        load_order(order, cached)


def _header(body: bytes) -> bytes:
    return parsecache._MAGIC + zlib.crc32(body).to_bytes(4, "big") + len(body).to_bytes(8, "big") + body


@pytest.mark.parametrize("damage", [
    "truncated", "empty", "garbage", "flipped byte", "wrong shape, right checksum", "another directory's",
    "entries of another shape", "a directory", "a value changed behind the checksum",
])
def test_a_broken_or_foreign_cache_is_ignored(cached, parses, damage):
    order = make_order(cached)
    expected = load_order(order, cached).tasks
    [file] = cache_files(cached)
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "garbage":
        file.write_bytes(os.urandom(len(data)))
    elif damage == "flipped byte":
        file.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "wrong shape, right checksum":
        file.write_bytes(_header(b"\xe9\x01\x00\x00\x00"))  # marshal of a bare int
    elif damage == "another directory's":  # e.g. an order directory copied, cache and all
        fingerprint, _, entries = marshal.loads(data[len(parsecache._MAGIC) + 12:])
        file.write_bytes(_header(marshal.dumps((fingerprint, str(cached / "elsewhere"), entries))))
    elif damage == "entries of another shape":
        fingerprint, where, entries = marshal.loads(data[len(parsecache._MAGIC) + 12:])
        entries = {name: (key, values[:-1]) for name, (key, values) in entries.items()}
        file.write_bytes(_header(marshal.dumps((fingerprint, where, entries))))
    elif damage == "a value changed behind the checksum":  # marshal would load it: only the CRC tells
        assert data.count(b"src/m1.py") == 1
        file.write_bytes(data.replace(b"src/m1.py", b"src/m7.py"))
    elif damage == "a directory":
        file.unlink()
        file.mkdir()
    parses.clear()
    assert load_order(order, cached).tasks == expected
    assert sorted(parses) == ["T0.yaml", "T1.yaml", "T2.yaml", "T3.yaml"]


def test_a_process_that_may_not_write_reads_the_cache_and_writes_nothing(cached, parses, monkeypatch):
    order = make_order(cached)
    monkeypatch.setattr(parsecache, "_writable", False)
    load_order(order, cached)
    assert not (cached / ".aipm" / "cache").exists()
    monkeypatch.setattr(parsecache, "_writable", True)
    load_order(order, cached)
    [file] = cache_files(cached)
    before = file.read_bytes()
    monkeypatch.setattr(parsecache, "_writable", False)
    (order / "T1.yaml").write_text((order / "T1.yaml").read_text() + "title: changed\n")
    parses.clear()
    assert load_order(order, cached).tasks["T1"].title == "changed"
    assert parses == ["T1.yaml"] and file.read_bytes() == before


@pytest.fixture
def in_memory(monkeypatch):
    """This process keeps its own cache between loads, as the dashboard does (put back after the test)."""
    monkeypatch.setattr(parsecache, "_memory", None)
    parsecache.in_memory()


def test_a_reader_that_may_not_write_parses_only_what_changed_since_its_last_load(cached, parses, monkeypatch,
                                                                                 in_memory):
    """The dashboard reads every order again at each change and writes no cache: while a run rewrote task files
    (so the cache file's entries of them missed), each read parsed every task already run again."""
    monkeypatch.setattr(parsecache, "_writable", False)
    order = make_order(cached)
    load_order(order, cached)
    assert sorted(parses) == ["T0.yaml", "T1.yaml", "T2.yaml", "T3.yaml"]
    parses.clear()
    path = order / "T1.yaml"
    path.write_text(path.read_text() + "title: changed\n")
    (order / "T3.yaml").unlink()
    loaded = load_order(order, cached)
    assert parses == ["T1.yaml"] and loaded.tasks["T1"].title == "changed" and sorted(loaded.tasks) == ["T0", "T1", "T2"]
    parses.clear()
    again = load_order(order, cached)
    assert parses == [] and again.tasks == loaded.tasks
    assert again.tasks == load_order(order, None).tasks
    assert not (cached / ".aipm" / "cache").exists()  # still nothing written


def test_what_a_reader_keeps_follows_the_same_rules_as_the_file(cached, parses, monkeypatch, in_memory):
    """A file within the racy window is not kept, an edit that restores size and mtime is seen, a file that
    became invalid is refused, and a target that now leads outside the root is refused."""
    monkeypatch.setattr(parsecache, "_writable", False)
    order = make_order(cached)
    monkeypatch.setattr(parsecache, "RACY_NS", 3600 * 10**9)
    load_order(order, cached)
    load_order(order, cached)
    assert len(parses) == 8
    monkeypatch.setattr(parsecache, "RACY_NS", 0)
    load_order(order, cached)
    parses.clear()
    path = order / "T1.yaml"
    info = path.stat()
    path.write_text(path.read_text().replace("P2", "P3"))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert load_order(order, cached).tasks["T1"].priority.value == "P3" and parses == ["T1.yaml"]
    path.write_text(path.read_text().replace("priority: P3", "priority: P9"))
    with pytest.raises(ValidationError, match="T1.yaml: priority: 'P9' is not one of"):
        load_order(order, cached)
    path.write_text(path.read_text().replace("priority: P9", "priority: P3"))
    load_order(order, cached)
    shutil.rmtree(cached / "src", ignore_errors=True)
    outside = Path(tempfile.mkdtemp())
    try:
        (cached / "src").symlink_to(outside)
        with pytest.raises(ValidationError, match="outside the project root"):
            load_order(order, cached)
    finally:
        shutil.rmtree(outside)


def test_no_runtime_directory_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(parsecache, "_writable", True)
    order = make_order(tmp_path)
    load_order(order, tmp_path)
    assert not (tmp_path / ".aipm").exists()


@pytest.mark.parametrize("field, value", [
    ("depends_on", 5), ("title", 5), ("command", ("make", 5)), ("tokens", {"input": "many"}),
    ("resources", ("2", None, None)), ("confine", "yes"), ("attempts", 1.5),
    # right types, but an id the parse refuses: another file's, or one that leads out of the order's runtime files
    ("id", "T0"), ("id", "../../evil"), ("id", "T1/.."),
])
def test_a_row_of_the_wrong_types_is_a_miss(cached, parses, field, value):
    """Right checksum, fingerprint and key, but a value parsing never gives: the file is parsed instead (before,
    `depends_on: 5` crashed the load with a TypeError, the others changed the Task)."""
    order = make_order(cached)
    expected = load_order(order, cached).tasks
    [file] = cache_files(cached)
    fingerprint, where, entries = marshal.loads(file.read_bytes()[len(parsecache._MAGIC) + 12:])
    key, values = entries["T1.yaml"]
    values = list(values)
    values[parsecache._NAMES.index(field)] = value
    entries["T1.yaml"] = (key, tuple(values))
    file.write_bytes(_header(marshal.dumps((fingerprint, where, entries))))
    parses.clear()
    assert load_order(order, cached).tasks == expected
    assert parses == ["T1.yaml"]


@pytest.mark.parametrize("entry", [5, "", "ab", None, (), ("key",), ("key", (), "extra"), [1, 2]])
def test_an_entry_that_is_no_key_and_row_is_a_miss_for_its_file_alone(cached, parses, entry):
    """Right checksum and fingerprint, but one file's entry is no (key, row) pair: that file is parsed, the others
    still come from the cache (such an entry crashed the load with a TypeError)."""
    order = make_order(cached)
    expected = load_order(order, cached).tasks
    [file] = cache_files(cached)
    fingerprint, where, entries = marshal.loads(file.read_bytes()[len(parsecache._MAGIC) + 12:])
    entries["T1.yaml"] = entry
    file.write_bytes(_header(marshal.dumps((fingerprint, where, entries))))
    parses.clear()
    assert load_order(order, cached).tasks == expected
    assert parses == ["T1.yaml"]


def test_a_cache_bigger_than_its_bound_is_neither_read_nor_written(cached, parses, monkeypatch):
    order = make_order(cached)
    load_order(order, cached)
    [file] = cache_files(cached)
    body = file.stat().st_size - len(parsecache._MAGIC) - 12
    monkeypatch.setattr(parsecache, "_MAX_BYTES", body - 1)
    (order / "T1.yaml").write_text((order / "T1.yaml").read_text() + "title: changed\n")
    time.sleep(0.01)
    before = file.stat().st_ino
    parses.clear()
    assert load_order(order, cached).tasks["T1"].title == "changed"
    assert sorted(parses) == ["T0.yaml", "T1.yaml", "T2.yaml", "T3.yaml"]  # not read
    assert file.stat().st_ino == before  # nor written: the new body is as big
    monkeypatch.setattr(parsecache, "_MAX_BYTES", body)
    load_order(order, cached)
    parses.clear()
    load_order(order, cached)
    assert parses == ["T1.yaml"]  # at the bound: read


def test_a_cache_directory_that_is_a_link_is_neither_read_nor_written(cached, parses, tmp_path_factory):
    """`.aipm/cache` leading out of the project (a worker can write into `.aipm/`): as if there were no cache."""
    order = make_order(cached)
    load_order(order, cached)
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "cache"
    (cached / ".aipm" / "cache").rename(elsewhere)
    (cached / ".aipm" / "cache").symlink_to(elsewhere)
    [file] = elsewhere.iterdir()
    before = file.read_bytes()
    (order / "T1.yaml").write_text((order / "T1.yaml").read_text() + "title: changed\n")
    time.sleep(0.01)  # T1 old enough to be remembered: a write would change the file
    parses.clear()
    assert load_order(order, cached).tasks["T1"].title == "changed"
    assert sorted(parses) == ["T0.yaml", "T1.yaml", "T2.yaml", "T3.yaml"]
    assert list(elsewhere.iterdir()) == [file] and file.read_bytes() == before


def test_the_temporary_file_is_never_written_through_a_link(cached, tmp_path_factory):
    order = make_order(cached)
    (cached / ".aipm" / "cache").mkdir()
    victim = tmp_path_factory.mktemp("elsewhere") / "victim"
    victim.write_bytes(b"mine")
    (cached / ".aipm" / "cache" / f".{cache_name(order)}.{os.getpid()}.tmp").symlink_to(victim)
    load_order(order, cached)
    assert victim.read_bytes() == b"mine"
    load_order(order, cached)  # the link was removed: this write makes the cache
    assert cache_files(cached) == [cached / ".aipm" / "cache" / cache_name(order)]


# -- property: the same order with and without the cache, whatever the files hold --------------------------

IDS = [f"T{i}" for i in range(6)]
task_fields = st.fixed_dictionaries({}, optional={
    "title": st.text(max_size=8).filter(lambda t: len(t.rstrip("\n").splitlines()) <= 1),  # one line
    "status": st.sampled_from(["QUEUED", "DONE", "IN_PROGRESS", "FAILED", "COMPLETED", "CANCELLED"]),
    "priority": st.sampled_from(["P0", "P1", "P2", "P3"]),
    "target_files": st.lists(st.sampled_from(["a.py", "src/", "src/b.py", "docs/**/*.md", "./c/../d.py", "e f"]),
                             max_size=3),
    "command": st.one_of(st.sampled_from(["true", "make -j2"]), st.lists(st.sampled_from(["a", "b c"]), min_size=1,
                                                                          max_size=3)),
    "timeout": st.integers(1, 10**5),
    "max_attempts": st.integers(1, 5),
    "attempts": st.integers(0, 5),
    "exit_code": st.integers(-9, 255),
    "resources": st.fixed_dictionaries({}, optional={"cpus": st.sampled_from([0.5, 2]), "memory_mb": st.just(512),
                                                     "gpus": st.just(1)}),
    "cost_usd": st.sampled_from([0.0, 0.25, 3.5]),
    "tokens": st.fixed_dictionaries({}, optional={"input": st.integers(0, 10**6), "output": st.integers(0, 99)}),
    "confine": st.booleans(),
    "workspace": st.sampled_from(["shared", "worktree"]),
    "workspace_copy": st.lists(st.sampled_from([".env", "conf/*.ini"]), max_size=2),
    "started_at": st.sampled_from(["2026-01-01T00:00:00+00:00", None]),
})
orders = st.lists(task_fields, min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tasks=orders, edits=st.lists(st.tuples(st.integers(0, 5), task_fields), max_size=3))
def test_loading_with_the_cache_equals_parsing(tasks, edits, monkeypatch):
    monkeypatch.setattr(parsecache, "_writable", True)
    monkeypatch.setattr(parsecache, "RACY_NS", 0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / ".aipm").mkdir()
        (root / "src").mkdir()
        order = root / "orders" / "ORD"
        order.mkdir(parents=True)
        for i, fields in enumerate(tasks):
            deps = [IDS[j] for j in range(i) if (i + j) % 3 == 0]
            (order / f"{IDS[i]}.yaml").write_text(yaml.safe_dump({**fields, "depends_on": deps}))
        time.sleep(0.01)
        for round_ in range(2):
            cold = load_order(order, None)
            warm = [load_order(order, root) for _ in range(2)]
            for loaded in warm:
                assert loaded.tasks == cold.tasks and list(loaded.tasks) == list(cold.tasks)
                assert plan(loaded).blocked == plan(cold).blocked
            for index, fields in edits if round_ == 0 else ():
                if index < len(tasks):
                    path = order / f"{IDS[index]}.yaml"
                    path.write_text(yaml.safe_dump({**fields, "depends_on": yaml.safe_load(path.read_text())
                                                    ["depends_on"]}))
            time.sleep(0.01)


# -- the command line --------------------------------------------------------------------------------------

def test_validate_writes_the_cache_and_read_commands_use_it_without_writing(project):
    order = project.order()
    for i in range(3):
        write_task(order, f"T{i}", command="true", target_files=[f"f{i}.txt"], depends_on=[f"T{i - 1}"] if i else [])
    reads = [("detect", "ORD", "--json"), ("status", "ORD", "--json"), ("why", "ORD/T1", "--json")]
    before = [proc.stdout for proc in project.aipm_all(reads, check=True)]
    (project.root / ".aipm").mkdir()
    # Files written within the last RACY_NS are not remembered (an edit in the same clock tick would not show).
    time.sleep(parsecache.RACY_NS / 1e9 + 0.1)
    project.aipm("validate", "ORD", check=True)
    [file] = cache_files(project.root)
    from conftest import snapshot  # every file but .aipm/
    tree, cache = snapshot(project.root), file.read_bytes()
    assert [proc.stdout for proc in project.aipm_all(reads, check=True)] == before
    assert snapshot(project.root) == tree and file.read_bytes() == cache and cache_files(project.root) == [file]
    data = json.loads(project.aipm("detect", "ORD", "--json", check=True).stdout)
    assert [t["id"] for t in data["launchable"]] == ["T0"]


def _detect_with_a_cache_file(project, make) -> tuple[Path, str]:
    """`detect` answers as without a cache when `make(path)` put something else at the cache file's path."""
    order = project.order()
    for i in range(3):
        write_task(order, f"T{i}", command="true", depends_on=[f"T{i - 1}"] if i else [])
    expected = project.aipm("detect", "ORD", "--json", check=True).stdout
    path = project.root / ".aipm" / "cache" / cache_name(order)
    path.parent.mkdir(parents=True)
    make(path)
    assert project.aipm("detect", "ORD", "--json", timeout=20, check=True).stdout == expected
    return path, expected


def test_a_fifo_at_the_cache_path_is_a_miss_and_the_next_write_replaces_it(project):
    path, expected = _detect_with_a_cache_file(project, os.mkfifo)  # before: detect waited for a writer
    time.sleep(parsecache.RACY_NS / 1e9 + 0.1)  # so that validate remembers the files
    project.aipm("validate", "ORD", timeout=20, check=True)
    assert path.is_file() and path.read_bytes().startswith(parsecache._MAGIC)
    assert project.aipm("detect", "ORD", "--json", check=True).stdout == expected


def test_a_huge_cache_file_is_a_miss(project):
    def sparse_terabyte(path):
        with open(path, "wb") as handle:
            handle.truncate(1 << 40)

    _detect_with_a_cache_file(project, sparse_terabyte)  # before: MemoryError, reading it whole


OLD_PROCESS = r'''
import sys
from pathlib import Path
from aipm import parsecache
from aipm.store import load_order
parsecache.writable()
parsecache.RACY_NS = 0
print(parsecache.__file__, flush=True)
sys.stdin.readline()  # meanwhile its sources are upgraded
root = Path(sys.argv[1])
load_order(root / "orders" / "ORD", root)
'''
UPGRADE = '''

_accepted_before = task_from_mapping


def task_from_mapping(path, data, root, normalise=None):  # the new version refuses a title
    if data.get("title") == "hello":
        raise ValidationError(str(path), "title", "hello is refused now")
    return _accepted_before(path, data, root, normalise)
'''


def test_a_process_upgraded_underneath_stamps_the_cache_with_the_code_it_runs(project, tmp_path_factory):
    """The fingerprint is taken as the code is imported: what an old process remembers after an upgrade on disk
    is not trusted by the new code (before, it was stamped with the new sources' fingerprint and trusted)."""
    installed = tmp_path_factory.mktemp("installed")
    shutil.copytree(Path(parsecache.__file__).parent, installed / "aipm", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(installed), AIPM_ENABLE_MONITORING="false")
    write_task(project.order(), "T0", command="true", title="hello")
    (project.root / ".aipm").mkdir()
    time.sleep(0.01)
    old = subprocess.Popen([sys.executable, "-c", OLD_PROCESS, str(project.root)], env=env, cwd=installed,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert old.stdout.readline().strip() == str(installed / "aipm" / "parsecache.py")
    fields = installed / "aipm" / "fields.py"
    fields.write_text(fields.read_text() + UPGRADE)
    old.communicate("go\n", timeout=60)
    assert old.returncode == 0 and len(cache_files(project.root)) == 1
    new = subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), "validate", "ORD"], env=env,
                         cwd=installed, capture_output=True, text=True, timeout=60)
    assert new.returncode == 2 and "title: hello is refused now" in new.stderr, new.stdout + new.stderr


def test_an_order_refused_for_a_cycle_writes_no_cache(cached):
    order = make_order(cached)
    path = order / "T0.yaml"
    path.write_text(path.read_text().replace("depends_on: []", "depends_on: [T3]"))
    with pytest.raises(ValidationError, match="dependency cycle"):
        load_order(order, cached)
    assert not (cached / ".aipm" / "cache").exists()
