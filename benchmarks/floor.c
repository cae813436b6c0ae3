/* The floor under B2 and B4: what the contract's durable status writes and starting each command cost on this
 * machine, with nothing else — no planning, no locks, no worker records, no go or exit file, no Python. A
 * reference row for the benchmarks (built by them with `cc` at run time), not part of aipm.
 *
 *   floor chain|serial|pool2 N ORDER_DIR PROGRAM [ARG...]     (in ARG, "%d" is replaced by the task's index)
 *
 * Task i is ORDER_DIR/T<i>.yaml (zero-padded to the width of N-1, as the benchmarks name them). Each status
 * write is the contract's: the new text into a temp file in the same directory, fsync, rename over the task
 * file, fsync of the directory. The temp file is the version an earlier write replaced (renameat2
 * RENAME_EXCHANGE into one of two temp names, as aipm's spares do): on ext4 without a journal a new inode
 * costs more than the fsync.
 *
 *   chain:  task i starts only once task i-1's DONE is durable (B2): DONE(i-1) and IN_PROGRESS(i) share one
 *           directory fsync, then i starts.
 *   serial: tasks share a file, so one runs at a time (B4): IN_PROGRESS(i) is durable before i starts; the
 *           DONE of i-1 is written while i runs, and so is the text of IN_PROGRESS(i+1) (written and fsynced
 *           ahead, as aipm's writer.prepare does), so a hand-over renames it and fsyncs the directory.
 *   pool2:  independent tasks on 2 slots (B1): at each wake-up the DONEs of the tasks that ended and the
 *           IN_PROGRESS of those that start in their places share one directory fsync, then they start. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static int dirfd_;
static char **texts;   /* original text of each task file */
static size_t *sizes;
static int width, n;

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void name_of(int i, char *out, size_t size) { snprintf(out, size, "T%0*d.yaml", width, i); }

/* The task file's new text (its original lines plus the managed ones) into its temp file, made durable; not
 * yet renamed. */
static void prepare(int i, const char *status, int slot) {
    char tmp[32], text[8192];
    snprintf(tmp, sizeof tmp, ".floor.%d.tmp", slot);
    int len = snprintf(text, sizeof text, "%.*sstatus: %s\nattempts: 1\nstarted_at: '2026-12-02T18:00:00+00:00'\n%s",
                       (int)sizes[i], texts[i], status,
                       strcmp(status, "DONE") ? "" : "finished_at: '2026-12-02T18:00:01+00:00'\nexit_code: 0\n");
    int fd = openat(dirfd_, tmp, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) die("open temp");
    if (pwrite(fd, text, len, 0) != len || ftruncate(fd, len) || fsync(fd)) die("write temp");
    close(fd);
}

static void commit(int i, int slot) {
    char name[64], tmp[32];
    name_of(i, name, sizeof name);
    snprintf(tmp, sizeof tmp, ".floor.%d.tmp", slot);
    if (renameat2(dirfd_, tmp, dirfd_, name, RENAME_EXCHANGE) && renameat(dirfd_, tmp, dirfd_, name))
        die("rename");
}

static void durable(void) {
    if (fsync(dirfd_)) die("fsync dir");
}

static pid_t start(int i, char **argv) {
    char *args[64], buf[64][256];
    int k = 0;
    for (; argv[k] && k < 63; k++) {
        if (strstr(argv[k], "%d")) {
            snprintf(buf[k], sizeof buf[k], argv[k], i);
            args[k] = buf[k];
        } else {
            args[k] = argv[k];
        }
    }
    args[k] = NULL;
    pid_t pid;
    if (posix_spawnp(&pid, args[0], NULL, NULL, args, environ)) die("spawn");
    return pid;
}

static void finish(pid_t pid) {
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "floor: a command failed\n");
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: floor chain|serial|pool2 N ORDER_DIR PROGRAM [ARG...]\n");
        return 2;
    }
    int chain = !strcmp(argv[1], "chain"), pool = !strcmp(argv[1], "pool2");
    n = atoi(argv[2]);
    width = snprintf(NULL, 0, "%d", n - 1);
    if ((dirfd_ = open(argv[3], O_RDONLY | O_DIRECTORY)) < 0) die(argv[3]);
    texts = calloc(n, sizeof *texts);
    sizes = calloc(n, sizeof *sizes);
    for (int i = 0; i < n; i++) {  /* read once, as a planner reads the order before it starts */
        char name[64];
        struct stat st;
        name_of(i, name, sizeof name);
        int fd = openat(dirfd_, name, O_RDONLY);
        if (fd < 0 || fstat(fd, &st)) die(name);
        texts[i] = malloc(st.st_size + 1);
        if (read(fd, texts[i], st.st_size) != st.st_size) die(name);
        sizes[i] = st.st_size;
        close(fd);
    }
    if (pool) {  /* slots 0/1 run tasks; temp slots 2k (IN_PROGRESS) and 2k+1 (DONE) of slot k */
        pid_t pids[2] = {0, 0};
        int task[2] = {-1, -1}, next = 0, running = 0;
        for (int k = 0; k < 2 && next < n; k++, next++) {
            prepare(next, "IN_PROGRESS", 2 * k);
            commit(next, 2 * k);
            task[k] = next;
        }
        durable();
        for (int k = 0; k < 2 && task[k] >= 0; k++, running++) pids[k] = start(task[k], argv + 4);
        while (running) {
            int status, ended[2] = {0, 0};
            pid_t pid = wait(&status);
            if (pid < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) die("wait");
            for (int k = 0; k < 2; k++) ended[k] = pids[k] == pid;
            for (int k = 0; k < 2; k++)  /* the other one too, if it has ended meanwhile */
                if (!ended[k] && pids[k] && waitpid(pids[k], &status, WNOHANG) == pids[k]) ended[k] = 1;
            int starting[2] = {-1, -1};
            for (int k = 0; k < 2; k++) {
                if (!ended[k]) continue;
                prepare(task[k], "DONE", 2 * k + 1);
                commit(task[k], 2 * k + 1);
                pids[k] = 0;
                running--;
                if (next < n) {
                    prepare(next, "IN_PROGRESS", 2 * k);
                    commit(next, 2 * k);
                    starting[k] = task[k] = next++;
                }
            }
            durable();
            for (int k = 0; k < 2; k++)
                if (starting[k] >= 0) { pids[k] = start(starting[k], argv + 4); running++; }
        }
        return 0;
    }
    for (int i = 0; i < n; i++) {
        if (chain) {
            if (i) prepare(i - 1, "DONE", 1);
            prepare(i, "IN_PROGRESS", 0);
            if (i) commit(i - 1, 1);
            commit(i, 0);
            durable();
            finish(start(i, argv + 4));
        } else {
            if (!i) prepare(i, "IN_PROGRESS", 0);
            commit(i, 0);
            durable();
            pid_t pid = start(i, argv + 4);
            if (i) {
                prepare(i - 1, "DONE", 1);
                commit(i - 1, 1);
                durable();
            }
            if (i + 1 < n) prepare(i + 1, "IN_PROGRESS", 0);
            finish(pid);
        }
    }
    prepare(n - 1, "DONE", 0);
    commit(n - 1, 0);
    durable();
    return 0;
}
