"""A confined worktree worker may write its worktree's git note (.git/worktrees/<name>/: its HEAD, index, own refs,
and so the `config` of its own common directory, its `commondir`, its `config.worktree`) and repositories it makes
in its targets. aipm, unconfined, runs git on that worktree after it: its end's capture, the stash it moves, `aipm
diff`, the next attempt's start and the clean-up. A program the worker named there (a hook, an fsmonitor, a gpg
program for signed commits, an upload-pack for a lazy fetch) that aipm's git ran would run outside the sandbox."""

from __future__ import annotations

import re

import pytest

from conftest import write_task
from test_confine import needs_landlock
from test_workspace import git, project_in, repo  # noqa: F401 - repo is a fixture

MAIN = '"${AIPM_LOG%/.aipm/*}"'  # the main tree's root, as a worker can work it out; refused to a confined one
MISSING = "1" * 40  # an object the repository lacks: reading it makes a partial clone fetch it from its promisor

# Shell run by the confined worker: `mk NAME` makes out/NAME, a program that, run, leaves ESCAPED-NAME in the main
# tree (where the worker itself cannot write) and prints its path.
TRAP = ('mk() { printf \'#!/bin/sh\\necho "$0 $*" 2>/dev/null >> %s/ESCAPED-%s\\nexit 0\\n\' "$M" "$1" > "out/$1"; '
        'chmod +x "out/$1"; echo "$PWD/out/$1"; }; ')
FETCH = ("[core]\n\trepositoryformatversion = 1\n[extensions]\n\tpartialClone = trap\n"
         "[remote \"trap\"]\n\turl = $M\n\tpromisor = true\n\tuploadpack = $(mk {name})\n")
# Every way the worker can name a program for a git in its worktree's git directory: its own common directory's
# config (the `git config` of its worktree writes it) and hooks, its config.worktree (read where the repository has
# extensions.worktreeConfig); a HEAD naming an object the repository lacks, for a lazy fetch; a repository in a
# target directory with the same config, beside one without commits (what makes a capture look at them).
PLANT = {
    "hooks": ('git config core.hooksPath "$PWD/out/hooks" && mkdir -p out/hooks && '
              'for h in reference-transaction post-checkout post-index-change; do cp "$(mk hook)" out/hooks/$h; '
              'done && rm "$C/hooks" && cp -r out/hooks "$C/hooks"'),
    "own config": ('git config core.fsmonitor "$(mk fsmonitor)" && git config log.showSignature true && '
                   'git config gpg.program "$(mk gpg)" && git config core.pager "$(mk pager)" && '
                   'git config diff.external "$(mk external)" && git config core.alternateRefsCommand '
                   '"$(mk alternates)" && git config extensions.partialClone trap && '
                   'git config remote.trap.url "$M" && git config remote.trap.promisor true && '
                   'git config remote.trap.uploadpack "$(mk fetch)"'),
    # A signed stash entry: what `git log -g` of the stash verifies where log.showSignature is set
    "signed stash": ("echo stashed >> out/w.txt && git stash -q && "
                     "c=$(git cat-file commit refs/stash | sed '/^committer /a gpgsig -----BEGIN PGP SIGNATURE-----\\n "
                     "x\\n -----END PGP SIGNATURE-----' | git hash-object -t commit -w --stdin) && "
                     "git update-ref -m signed refs/stash $c"),
    "config.worktree": ('printf \'[core]\\n\\tfsmonitor = %s\\n[log]\\n\\tshowSignature = true\\n[gpg]\\n\\tprogram = '
                        '%s\\n\' "$(mk worktree-fsmonitor)" "$(mk worktree-gpg)" >> "$G/config.worktree"'),
    "nested": (f'git init -q out/empty && git init -q out/nested && cat > out/nested/.git/config <<EOF\n'
               f'{FETCH.format(name="nested-fetch")}EOF\n'
               f'echo {MISSING} > out/nested/.git/HEAD'),
    "head": f"echo {MISSING} > \"$G/HEAD\"",
}
# A worker that re-points its note's `commondir` to a directory of its own, config and all (the next attempt's)
REPOINT = (f'mkdir -p out/common/refs && ln -s "$C/objects" out/common/objects && '
           f'cat > out/common/config <<EOF\n{FETCH.format(name="commondir-fetch")}EOF\n'
           f'echo "$PWD/out/common" > "$G/commondir" && echo {MISSING} > "$G/HEAD"')


@needs_landlock
@pytest.mark.parametrize("worktree_config", [True, False], ids=["worktreeConfig", "plain"])
def test_no_program_a_confined_worker_names_in_its_git_directory_runs_outside_its_sandbox(repo, worktree_config):
    """A confined worker planted in its worktree's git directory, and in repositories it made, programs for git to
    run: with the worktree's own config (`git config` writes it) git verified the signature of the stash entry it
    left, running its gpg.program, when aipm moved its stash (`git log -g`); a HEAD naming an object that the
    repository lacks, with its config a partial clone's, had aipm's `git rev-parse HEAD^{commit}` (its end's
    capture, `aipm diff`) fetch it through its upload-pack; so did a repository it made in a target directory,
    looked at by the capture; its config.worktree (extensions.worktreeConfig) was read by the capture's `git add`,
    its fsmonitor run; a `commondir` re-pointed to a directory of its own led git there. Each ran unconfined, as
    aipm. (Its hooks, in a hooks directory of its own and core.hooksPath, never did: aipm's git runs none.) Now
    aipm's git reads none of them: across two attempts (the first fails), `aipm diff`, `aipm retry`, the next
    start's removal of the first worktree, the merge and the clean-up, nothing the worker named runs, and its own
    git works (commit, stash, log, diff, config)."""
    if worktree_config:
        git(repo, "config", "extensions.worktreeConfig", "true")
    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    setup = ('M=' + MAIN + '; G=$(git rev-parse --absolute-git-dir); C=$(git rev-parse --git-common-dir); '
             'C=$(cd "$C" && pwd -P); ' + TRAP + "mkdir -p out && ")
    mine = ('echo work > out/w.txt && git add out/w.txt && git commit -q -m mine && '
            'git log -1 --format=%s | grep -q mine && echo more >> out/w.txt && ! git diff --quiet && '
            'git stash -q && git stash pop -q && '
            'git config user.name worker && echo GIT-WORKS; touch "$M/ESCAPED-worker" 2>/dev/null && '
            'echo UNCONFINED; ')
    first = "".join(f"{plant} && echo PLANTED {name}\n" for name, plant in PLANT.items())
    second = "".join(f"{PLANT[name]} && echo PLANTED {name}\n" for name in ("config.worktree", "head"))
    command = (setup + mine + f'if [ "$AIPM_ATTEMPT" = 1 ]; then\n{first}exit 3\nfi\n{second}'
               f'{REPOINT} && echo PLANTED commondir\n')
    write_task(project.order(), "T", target_files=["out/"], max_attempts=1, max_rework=0, command=command)
    # What ran, and its arguments (the first run's)
    escaped = lambda: {p.name: p.read_text().splitlines()[0] for p in sorted(repo.glob("ESCAPED-*"))}  # noqa: E731
    proc = project.aipm("run", "ORD")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert escaped() == {}, log
    assert "GIT-WORKS" in log and "UNCONFINED" not in log, log
    assert all(f"PLANTED {name}\n" in log for name in PLANT), log
    assert project.statuses() == {"T": "FAILED"}, proc.stdout + proc.stderr + log
    diff = project.aipm("diff", "T")
    assert "+work" in diff.stdout, diff
    assert escaped() == {}
    assert project.aipm("retry", "T").returncode == 0
    proc = project.aipm("run", "ORD")
    log2 = (repo / ".aipm/logs/ORD/T.2.log").read_text()
    assert "GIT-WORKS" in log2 and "UNCONFINED" not in log2, log2
    assert all(f"PLANTED {name}\n" in log2 for name in ("config.worktree", "head", "commondir")), log2
    assert escaped() == {}, proc.stdout + proc.stderr + log2
    assert project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr + log2
    assert (repo / "out/w.txt").read_text() == "work\nmore\n"
    assert project.aipm("recover", "ORD").returncode == 0
    assert escaped() == {}
    assert escaped() == {}


# What a confined worker tried to leave in the repository's object store, which every git of the repository reads:
# another object store (alternates, http-alternates), a commit-graph (parents and trees git takes instead of the
# commits'), a list of packs, a lock that stops your `git maintenance`, and a directory of its own there
STORE = ("info/alternates", "info/http-alternates", "info/commit-graph", "info/commit-graphs/commit-graph-chain",
         "info/packs", "maintenance.lock", "mine/x")


@needs_landlock
def test_a_confined_worker_leaves_nothing_in_the_repositorys_object_store_but_objects(repo):
    """A confined worktree worker could add objects to the repository (it must, to commit), and with them anything
    in its object store: an `objects/info/alternates` naming a store of its own, from which your git read objects
    after the attempt, a commit-graph that your git took for its history, an `objects/maintenance.lock`. Then only
    its fan-out directories and `pack/` took files; now nothing there does (its git adds objects to a store of its
    own): its commit, stash, log, diff and `git gc` still work."""
    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    store = repo / ".git" / "objects"
    # Beside objects: every path but the fan-out directories, what they hold, and packs
    beside = lambda: {str(p.relative_to(store)) for p in store.rglob("*")  # noqa: E731
                      if not re.fullmatch("[0-9a-f]{2}|pack", p.relative_to(store).parts[0])}
    before = beside()
    plant = "".join(f'mkdir -p "$(dirname "$O/{name}")"; echo "$PWD/out" > "$O/{name}" || echo REFUSED {name}\n'
                    for name in STORE)
    command = (f'O="{store}"; mkdir -p out && ' + plant
               + 'echo work > out/w.txt && git add out/w.txt && git commit -q -m mine && echo more >> out/w.txt && '
               '! git diff --quiet && git stash -q && git stash pop -q && git log -1 --format=%s | grep -q mine && '
               'git gc -q && git cat-file -e HEAD:out/w.txt && echo GIT-WORKS\n')
    write_task(project.order(), "T", target_files=["out/"], max_attempts=1, max_rework=0, command=command)
    proc = project.aipm("run", "ORD")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "GIT-WORKS" in log, proc.stdout + proc.stderr + log
    assert all(f"REFUSED {name}\n" in log for name in STORE), log
    assert beside() == before, log
    assert project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr + log
    assert (repo / "out/w.txt").read_text() == "work\nmore\n"


@needs_landlock
def test_a_confined_worker_that_names_another_tasks_worktree_in_its_git_note_reaches_nothing_of_that_task(repo):
    """git's note of a worktree names it in its `gitdir`, which the worktree's worker may write, a confined one too.
    aipm found a task's note by what that file said: a worker that named another task's worktree there had its
    own stash left unmoved (its note was no one's), and that other task's end took its note for theirs (or theirs
    for it): one of the two stashes was never moved to the repository's, and went with its worktree. Now aipm
    finds a note by the name it gave it: each task's stash is moved, once."""
    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    order = project.order()
    claim = ('echo "gitdir: $(dirname "$PWD")/B/.git" > "$(git rev-parse --absolute-git-dir)/gitdir" && '
             'mkdir -p a && echo a > a/f && git add a/f && git stash push -q -m A-STASH && echo A-STASHED')
    # B stashes once A's end is over (merged, its worktree removed)
    wait = f'until grep -q "status: DONE" {order / "A.yaml"}; do sleep 0.1; done; sleep 2; '
    write_task(order, "A", target_files=["a/"], max_attempts=1, max_rework=0, command=claim)
    write_task(order, "B", target_files=["b/"], max_attempts=1, max_rework=0,
               command=wait + 'mkdir -p b && echo b > b/f && git add b/f && git stash push -q -m B-STASH')
    proc = project.aipm("run", "ORD")
    logs = "".join((repo / f".aipm/logs/ORD/{t}.1.log").read_text() for t in "AB")
    assert "A-STASHED" in logs, logs
    assert project.statuses() == {"A": "DONE", "B": "DONE"}, proc.stdout + proc.stderr + logs
    stashed = git(repo, "log", "-g", "--format=%gs", "refs/stash").splitlines()
    assert [s.rsplit(": ", 1)[-1] for s in stashed if "-STASH" in s] == ["B-STASH", "A-STASH"], (stashed, logs)


# Left running by the worker, out of its group and environment, its lock descriptors closed: once aipm's git reads
# the worktree's stash log (a FIFO it fills then), it swaps the worktree's own refs and their logs for links to the
# repository's.
SWAP = """
import os, sys
note, user = sys.argv[1:]
os.closerange(3, 1 << 16)
if os.fork():
    os._exit(0)
os.setsid()
log = note + "/logs/refs/worktree/aipm/stash"
saved = open(log + ".saved", "rb").read()
with open(log, "wb") as fifo:
    fifo.write(saved)
for mine, theirs in (("refs/worktree/aipm", "refs"), ("logs/refs/worktree/aipm", "logs/refs")):
    os.rename(f"{note}/{mine}", f"{note}/{mine}.x")
    os.symlink(f"{user}/{theirs}", f"{note}/{mine}")
"""


@needs_landlock
def test_a_process_a_confined_worker_leaves_running_cannot_turn_the_move_of_its_stash_onto_the_users(repo):
    """A confined worker's daemon (`setsid`, its environment cleared, its descriptors closed) outlives its attempt
    while another attempt of the run goes on: it is no stray of this attempt's to aipm, and ended only at the run's
    end. aipm's view of the worktree linked its own refs: between the check that they were the worktree's own and
    the deletion of its stash, once moved, the daemon swapped them for links to the repository's refs, and the
    deletion deleted the user's stash. Now the view holds copies, and the worktree's stash is deleted in its note
    without following a link: the user's stash keeps the user's entry, and the worker's is moved to it."""
    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    order = project.order()
    stash = lambda: git(repo, "log", "-g", "--format=%gs", "refs/stash", "--").splitlines()  # noqa: E731
    user_stash = stash()
    assert user_stash
    command = ('G=$(git rev-parse --absolute-git-dir) && mkdir -p out && echo s > out/s && git add out/s && '
               'git stash push -q -m T-STASH && L="$G/logs/refs/worktree/aipm/stash" && mv "$L" "$L.saved" && '
               f'mkfifo "$L" && env -i "$(command -v python3)" -c \'{SWAP}\' "$G" "{repo / ".git"}" && echo LEFT')
    write_task(order, "T", target_files=["out/"], max_attempts=1, max_rework=0, command=command)
    write_task(order, "U", target_files=["u/"], max_attempts=1, max_rework=0,
               command=f'until grep -q "status: DONE" {order / "T.yaml"}; do sleep 0.1; done; sleep 1')
    proc = project.aipm("run", "ORD")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "LEFT" in log, proc.stdout + proc.stderr + log
    assert project.statuses() == {"T": "DONE", "U": "DONE"}, proc.stdout + proc.stderr + log
    stashed = stash()
    assert stashed == ["On (no branch): T-STASH", *user_stash], (stashed, log)


@needs_landlock
def test_the_object_store_of_a_shared_repository_keeps_its_permissions_after_a_confined_attempt(repo):
    """In a repository shared by a group (`git init --shared=group`, core.sharedRepository), git makes each fan-out
    directory of its object store group-writable (setgid), so that every member may add objects there. Those the
    confined start made beforehand (for its worker's git to add objects there) took aipm's umask (0755): another
    member's `git commit` writing an object there was refused ("insufficient permission for adding an object to
    repository database"). Now the start makes none, and what the worker committed is added by aipm's git, with
    the repository's permissions."""
    import os
    import stat

    git(repo, "config", "core.sharedRepository", "group")
    store = repo / ".git" / "objects"
    for made in [store, *(p for p in store.iterdir() if p.is_dir())]:
        os.chmod(made, 0o2775)  # as `git init --shared=group` and its commits make them
    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    write_task(project.order(), "T", target_files=["out/"], max_attempts=1, max_rework=0,
               command="mkdir -p out && echo work > out/w.txt && git add out && git commit -q -m mine")
    proc = project.aipm("run", "ORD")
    assert project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr
    packs = [p for p in (store / "pack").iterdir()]
    assert packs and all(stat.S_IMODE(os.stat(p).st_mode) & 0o040 for p in packs), packs
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in store.iterdir()
             if re.fullmatch("[0-9a-f]{2}|pack", p.name)}
    assert modes
    assert {name: oct(mode) for name, mode in modes.items() if mode & 0o2070 != 0o2070} == {}


# A confined worker's writes in the repository's object store, each printed as "DONE NAME" or "REFUSED NAME errno"
PROBE = """
import errno, os, stat
def attempt(name, action):
    try:
        action()
        print("DONE", name, flush=True)
    except OSError as exc:
        print("REFUSED", name, errno.errorcode.get(exc.errno), flush=True)
def rewrite(path):
    os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR)
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)
def create(path):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
attempt("rewrite", lambda: rewrite("{rewrite}"))
attempt("truncate", lambda: os.truncate("{rewrite}", 0))
attempt("delete", lambda: os.unlink("{delete}"))
attempt("add", lambda: (os.makedirs(os.path.dirname("{add}"), exist_ok=True), create("{add}")))
attempt("pack", lambda: create("{pack}"))
"""


@needs_landlock
def test_a_confined_worker_can_neither_rewrite_nor_delete_an_object_of_the_repository(repo):
    """Landlock cannot tell git's adding of an object from the rewriting or deletion of one: with write rights in the
    object store's fan-out directories (for its git to commit), a confined worker could chmod an object HEAD uses
    and write over it (your checkout of that file then held the worker's bytes), delete it, or add a file of its
    own under an object's name. Now its git adds objects in a store of its own, and the repository's takes none
    of its writes: each gets EACCES, every object stays as it was, and its commit is still merged."""
    import os

    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    store = repo / ".git" / "objects"
    blob = git(repo, "rev-parse", "HEAD:src/a.txt").strip()
    loose = store / blob[:2] / blob[2:]
    assert loose.is_file()
    before = loose.read_bytes()
    other = git(repo, "rev-parse", "HEAD:src/b.txt").strip()
    victim = store / other[:2] / other[2:]
    evil = store / "ee" / ("e" * 38)
    # Each write as a worker's own program would make it: in place (no truncation), by unlinking, by creating
    probe = PROBE.format(rewrite=str(loose), delete=str(victim), add=str(evil),
                         pack=str(store / "pack" / ("pack-" + "e" * 40 + ".pack")))
    command = (f"python3 -c '{probe}'\nmkdir -p out && echo work > out/w.txt && git add out/w.txt && "
               "git commit -q -m mine && git stash list >/dev/null && echo GIT-WORKS && "
               'echo "MADE $(git rev-parse HEAD) IN $(git rev-parse --path-format=absolute --git-path objects)"\n')
    write_task(project.order(), "T", target_files=["out/"], max_attempts=1, max_rework=0, command=command)
    proc = project.aipm("run", "ORD")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("DONE ")] == [], log
    assert all(f"REFUSED {name} EACCES\n" in log for name in ("rewrite", "truncate", "delete", "add", "pack")), log
    assert "GIT-WORKS" in log, proc.stdout + proc.stderr + log
    assert loose.read_bytes() == before and victim.is_file()
    assert not os.path.lexists(evil)
    assert git(repo, "cat-file", "blob", blob) == (repo / "src/a.txt").read_text()
    git(repo, "fsck", "--strict", "--no-dangling")
    assert project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr + log
    assert (repo / "out/w.txt").read_text() == "work\n"
    # Its commit was made in its own store, in git's note of its worktree (gone with it), and taken into yours
    made, own = re.search(r"^MADE (\S+) IN (.+)$", log, re.M).groups()
    assert own.startswith(f"{repo / '.git' / 'worktrees'}/"), own
    assert git(repo, "log", "-1", "--format=%s", made) == "mine\n"


@needs_landlock
def test_a_confined_worker_that_fetches_twice_has_its_work_merged(repo, tmp_path):
    """A confined worker fetched twice from another repository: the first fetch's few objects were unpacked as loose
    objects (fewer than transfer.unpackLimit), the second's kept as a pack whose commits have the first's as
    parents. aipm gave that pack to `git index-pack --strict` before the loose objects, which refused it ("did not
    receive expected object"): the capture failed and the attempt was REJECTED. Now its commit is merged."""
    other = tmp_path / "other"
    git(tmp_path, "init", "-q", str(other))
    for name, count in (("early", 3), ("late", 60)):
        for i in range(count):
            (other / f"{name}{i}").write_text(f"{i}\n")
            git(other, "add", ".")
            git(other, "commit", "-q", "-m", f"{name} {i}")
        if name == "early":
            git(other, "tag", "early")
    _fetch_and_commit(repo, f'git fetch -q "{other}" early:refs/tags/early && git fetch -q "{other}" HEAD',
                      "FETCH_HEAD:late5")
    assert (repo / "out/w").read_text() == "5\n"


def _fetch_and_commit(repo, fetch: str, shown: str) -> None:  # noqa: F811
    """A confined worktree task that runs `fetch`, commits what `git show` gives of `shown` as out/w: DONE."""
    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    command = (f"{fetch} && mkdir -p out && git show {shown} > out/w && git add out && git commit -q -m mine && "
               "echo FETCHED")
    write_task(project.order(), "T", target_files=["out/"], max_attempts=1, max_rework=0, command=command)
    proc = project.aipm("run", "ORD")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "FETCHED" in log, log
    assert project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr + log


@needs_landlock
@pytest.mark.parametrize("how", ["run", "launch"])
def test_the_users_git_walks_every_worktree_while_a_confined_worker_that_committed_runs(repo, how):
    """A confined worker's commits are made in its own object store while its HEAD, in the repository's
    `.git/worktrees/`, names them: the user's `git log --all`, `git fsck` and `git gc` failed ("bad object
    worktrees/...") until the attempt ended, hours for an agent. Its owner (the run, or a launch's detached
    worker) now takes them in every few seconds while it runs (intake.py): they pass while the worker still
    waits, and its commit is merged at the end."""
    import subprocess
    import sys

    from conftest import wait_for

    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    gate = repo.parent / "gate"
    command = (f"mkdir -p out && echo work > out/w.txt && git add out && git commit -q -m mine && "
               f"echo COMMITTED $(git rev-parse HEAD) && while [ ! -e {gate} ]; do sleep 0.05; done")
    write_task(project.order(), "T", target_files=["out/"], max_attempts=1, max_rework=0, command=command)
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), how, "ORD"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = repo / ".aipm/logs/ORD/T.1.log"
        made = wait_for(lambda: log.is_file() and re.search(r"^COMMITTED (\S+)$", log.read_text(), re.M))[1]

        def walks() -> bool:
            return subprocess.run(["git", "log", "--all", "--format=%H"], cwd=repo, capture_output=True,
                                  text=True).returncode == 0

        wait_for(walks, timeout=20)
        assert made in git(repo, "log", "--all", "--format=%H")
        git(repo, "fsck", "--strict", "--no-dangling")
        git(repo, "gc", "--quiet")
        assert project.statuses() == {"T": "IN_PROGRESS"}  # all of this while the worker runs
    finally:
        gate.touch()
        out, err = run.communicate(timeout=120)
    assert run.returncode == 0, out + err
    wait_for(lambda: project.statuses() == {"T": "DONE"})
    assert (repo / "out/w.txt").read_text() == "work\n"
    assert git(repo, "log", "-1", "--format=%s", made) == "mine\n"


def test_a_confined_worker_that_fetches_history_fsck_only_warns_of_has_its_work_merged(repo, tmp_path):
    """A confined worker fetched history that git takes and fsck only warns of: a tree naming its subtree with the
    mode `040000`, as old git wrote it (zeroPaddedFilemode). `git index-pack --strict`, taking its objects, made
    that warning an error: the capture failed and the attempt was REJECTED. Now its commit is merged."""
    other = tmp_path / "other"
    git(tmp_path, "init", "-q", str(other))
    (tmp_path / "f").write_text("old\n")
    blob = git(other, "hash-object", "-w", str(tmp_path / "f")).strip()
    (tmp_path / "sub").write_bytes(b"100644 f\0" + bytes.fromhex(blob))
    sub = git(other, "hash-object", "-t", "tree", "-w", str(tmp_path / "sub")).strip()
    (tmp_path / "padded").write_bytes(b"040000 sub\0" + bytes.fromhex(sub))
    padded = git(other, "hash-object", "-t", "tree", "--literally", "-w", str(tmp_path / "padded")).strip()
    git(other, "update-ref", "HEAD", git(other, "commit-tree", padded, "-m", "old history").strip())
    _fetch_and_commit(repo, f'git fetch -q "{other}" HEAD', "FETCH_HEAD:sub/f")
    assert (repo / "out/w").read_text() == "old\n"
    assert git(repo, "cat-file", "-t", padded) == "tree\n"
