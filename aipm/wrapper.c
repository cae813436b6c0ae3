/* The worker wrapper without libc, for commands that are programs: what runner.py's /bin/sh wrapper does, in
 * one small static process that starts in ~0.05 ms instead of a dynamically linked shell's ~0.6 ms (glibc's
 * start-up asks the CPU for its cache geometry, and every such question traps to the hypervisor on a VM).
 *
 *   aipm-wrapper EXIT_FILE LIMIT PROGRAM [ARG...]     (environment: AIPM_ROOT; the go pipe on fd 3)
 *
 * Changes to $AIPM_ROOT (126 if it cannot), waits for "go\n" on fd 3 (125, running nothing, on EOF or
 * anything else), runs PROGRAM as `sh -c '"$@"'` would (PATH search, a file without #! run by /bin/sh, 127
 * not found, 126 not executable; PATH must be set), writes its exit code (128+N if killed by signal N) and a
 * newline to EXIT_FILE (where that cannot be made or written, a last line "aipm-wrapper: PROGRAM: exit file not written; exit
 * code N" to the log), and exits with that code (a stop signal to its group after the go waits for the command). The exit file is made at the start as EXIT_FILE.w and takes
 * its name, code inside, when the command ends (a new file costs more than the rest of the wrapper on ext4
 * without a journal, which scans the inodes freed in the last minute: off the critical path, while the launcher
 * writes the task's status); a wrapper that runs nothing removes it. Before the go no signal is caught: a
 * signal to the process group ends the wrapper too, with no exit file. x86-64 Linux only; elsewhere the build fails and
 * aipm keeps using the shell.
 *
 * LIMIT (whole seconds on the boot clock from the go; 0: none) bounds the attempt when no owner is left to: the
 * owner (runner.py) gives its own time limit plus a margin, so a live owner, which acts at its limit, stays the one
 * that stops the attempt. When LIMIT passes with the command still running, the wrapper does what the owner would
 * (stopping.py): SIGTERM (and SIGCONT) to its group, SIGKILL to the command 5 s later if it is still there, its
 * code in the exit file followed by " timed-out" (so whoever records the attempt later records a timeout), and
 * then SIGKILL to the whole group, itself included, so nothing the attempt started outlives it. With a LIMIT, the
 * code is also followed by the command's end on the boot clock (" @SECONDS.CC"): one that ended by itself past its
 * owner's limit, but before the wrapper's, with no owner left to stop it, is recorded as timed out too. */

#if !defined(__x86_64__) || !defined(__linux__)
#error "aipm-wrapper: x86-64 Linux only"
#endif

enum { SYS_READ = 0, SYS_WRITE = 1, SYS_OPEN = 2, SYS_CLOSE = 3, SYS_RT_SIGACTION = 13, SYS_RT_SIGPROCMASK = 14,
       SYS_FORK = 57, SYS_EXECVE = 59, SYS_WAIT4 = 61, SYS_KILL = 62, SYS_CHDIR = 80, SYS_RENAME = 82, SYS_UNLINK = 87,
       SYS_TIMER_CREATE = 222, SYS_TIMER_SETTIME = 223, SYS_CLOCK_GETTIME = 228, SYS_EXIT_GROUP = 231 };
enum { SIG_KILL = 9, SIG_ALRM = 14, SIG_TERM = 15, SIG_CONT = 18, SA_RESTORER_ = 0x04000000, CLOCK_BOOTTIME_ = 7,
       TIMER_ABSTIME_ = 1 };
enum { GRACE = 5 };  /* seconds from the SIGTERM to the SIGKILL: stopping.KILL_GRACE */
enum { E_NOENT = 2, E_INTR = 4, E_NOEXEC = 8, E_ACCES = 13, E_NOTDIR = 20, E_NAMETOOLONG = 36, E_LOOP = 40 };
enum { O_WRONLY_ = 01, O_CREAT_ = 0100, O_TRUNC_ = 01000, O_NOFOLLOW_ = 0400000, O_CLOEXEC_ = 02000000 };

static long sys(long n, long a, long b, long c, long d) {
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}

static void __attribute__((noreturn)) leave(int code) {
    for (;;) sys(SYS_EXIT_GROUP, code, 0, 0, 0);
}

static long length(const char *s) {
    long n = 0;
    while (s[n]) n++;
    return n;
}

/* v (>= 0) in decimal, null-terminated; returns its length. */
static int decimal(long v, char *out) {
    int n = 1;
    for (long w = v; w >= 10; w /= 10) n++;
    out[n] = 0;
    for (int i = n - 1; i >= 0; i--, v /= 10) out[i] = (char)('0' + v % 10);
    return n;
}

/* A line to the log: "WHO" "PROGRAM: WHAT DETAIL". */
static void say(const char *who, const char *program, const char *what, const char *detail) {
    const char *parts[] = {who, program, ": ", what, detail, "\n"};
    for (int i = 0; i < 6; i++) sys(SYS_WRITE, 2, (long)parts[i], length(parts[i]), 0);
}

static const char *getenv_(char **envp, const char *name) {
    for (; *envp; envp++) {
        const char *e = *envp, *n = name;
        while (*n && *e == *n) e++, n++;
        if (!*n && *e == '=') return e + 1;
    }
    return 0;
}

/* Whether two strings are equal (no libc here). */
static int same(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

/* The exit code of `true` and `false`, which `sh -c '"$@"'` runs as builtins, ignoring their arguments; -1 for any
 * other program. They end here, with no fork and no exec (a dynamically linked program's start costs ~0.6 ms on a
 * VM), as they would in the shell wrapper. */
static int builtin(const char *program) {
    return same(program, "true") ? 0 : same(program, "false") ? 1 : -1;
}

/* execve, and for a file the kernel cannot run (no #!), /bin/sh on it, as a shell does. The argv for that is
 * made in place, as dash makes it: argv[-1] is this child's copy of EXIT_FILE's slot, unused here. */
static long exec(const char *path, char **argv, char **envp) {
    long r = sys(SYS_EXECVE, (long)path, (long)argv, (long)envp, 0);
    if (r != -E_NOEXEC) return r;
    char *first = argv[0];
    argv[-1] = "/bin/sh";
    argv[0] = (char *)path;
    r = sys(SYS_EXECVE, (long)"/bin/sh", (long)(argv - 1), (long)envp, 0);
    argv[0] = first;
    return r;
}

/* dash's exit codes: 127 when nothing by that name could be found, 126 when something was and would not run; and
 * its words, as `sh -c` says them: the command's failure, where "aipm-wrapper: x: not found" read as aipm's. */
static void __attribute__((noreturn)) fail(const char *program, long error) {
    int missing = error == -E_NOENT || error == -E_NOTDIR || error == -E_LOOP || error == -E_NAMETOOLONG;
    say("sh: 1: ", program, error == -E_ACCES ? "Permission denied" : missing ? "not found" : "cannot execute", "");
    leave(missing ? 127 : 126);
}

/* A PATH search as dash's: every entry is tried, and the last error other than "not there" (or "not allowed":
 * dash's search passes over a file without the x bit) is the one reported.
 * runner.py uses the shell when PATH is unset (its default PATH is the shell's own). */
static void __attribute__((noreturn)) run(char **argv, char **envp) {
    const char *program = argv[0];
    for (const char *c = program; *c; c++)
        if (*c == '/') fail(program, exec(program, argv, envp));
    const char *path = getenv_(envp, "PATH");
    if (!path) fail(program, -E_NOENT);
    long error = -E_NOENT, plen = length(program);
    char full[4096];
    for (;;) {
        long n = 0;
        while (path[n] && path[n] != ':') n++;
        if ((n ? n : 1) + 1 + plen < (long)sizeof full) {
            long at = 0;
            if (n == 0) full[at++] = '.';  /* an empty PATH entry is the current directory */
            for (long i = 0; i < n; i++) full[at++] = path[i];
            full[at++] = '/';
            for (long i = 0; i <= plen; i++) full[at++] = program[i];
            long r = exec(full, argv, envp);
            if (r != -E_NOENT && r != -E_NOTDIR && r != -E_ACCES) error = r;  /* dash passes files it may not run */
        } else {
            error = -E_NAMETOOLONG;
        }
        if (!path[n]) break;
        path += n + 1;
    }
    fail(program, error);
}

static void ring(int sig) {  /* the limit's timer: only to end the wait4 (EINTR), after which the clock is read */
    (void)sig;
}

void restore(void);  /* where ring() returns to: rt_sigreturn (the SA_RESTORER that libc would give) */
__asm__(".text\n.globl restore\nrestore:\n  mov $15, %eax\n  syscall\n");

/* Reaps the command (`pid`) into *status as wait4 does. With a limit, once `limit` seconds have passed on the boot
 * clock with the command still running, it stops the group as its owner would: SIGTERM (and SIGCONT) to the group,
 * SIGKILL to the command GRACE seconds later; *stopped says it did. The wrapper sleeps in wait4 all along (slots.py
 * takes a worker asleep there with one child for one blocked on it): a timer's SIGALRM, every second from the limit
 * on, interrupts the wait to look at the clock (one that comes just before the wait is not lost: the next one
 * comes). Set up after the fork: the command inherits neither handler nor timer. Where the kernel refuses the timer,
 * the limit is its owner's alone, as before. */
static long reap(long pid, long limit, const char *program, int *status, int *stopped) {
    long now[2], at = 0;
    struct { void (*handler)(int); unsigned long flags; void (*restorer)(void); unsigned long mask; } act = {
        ring, SA_RESTORER_, restore, 0};  /* no SA_RESTART: the signal ends the wait4 with EINTR */
    struct { long value; int signo, notify, pad[12]; } event = {0, SIG_ALRM, 0 /* SIGEV_SIGNAL */, {0}};
    int timer;
    if (limit > 0 && sys(SYS_CLOCK_GETTIME, CLOCK_BOOTTIME_, (long)now, 0, 0) == 0
        && sys(SYS_RT_SIGACTION, SIG_ALRM, (long)&act, 0, sizeof act.mask) == 0
        && sys(SYS_TIMER_CREATE, CLOCK_BOOTTIME_, (long)&event, (long)&timer, 0) == 0) {
        at = now[0] + limit;
        long spec[4] = {1, 0, at, now[1]};  /* struct itimerspec: every second from `at` on, absolute */
        if (sys(SYS_TIMER_SETTIME, timer, TIMER_ABSTIME_, (long)spec, 0) < 0) at = 0;
    }
    long r;
    while ((r = sys(SYS_WAIT4, pid, (long)status, 0, 0)) == -E_INTR) {
        if (!at || sys(SYS_CLOCK_GETTIME, CLOCK_BOOTTIME_, (long)now, 0, 0) < 0 || now[0] < at) continue;
        if (*stopped) {
            sys(SYS_KILL, pid, SIG_KILL, 0, 0);  /* the grace is over; the rest of the group goes after the code */
            continue;
        }
        say("aipm-wrapper: ", program, "time limit passed with no owner stopping it: sending SIGTERM to the process group", "");
        sys(SYS_KILL, 0, SIG_TERM, 0, 0);  /* (blocked here: the wrapper waits for its command) */
        sys(SYS_KILL, 0, SIG_CONT, 0, 0);  /* a stopped group would otherwise never see the SIGTERM */
        at = now[0] + GRACE;  /* (a tick comes at the same fraction of a second: GRACE s from now) */
        *stopped = 1;
    }
    return r;
}

static char early[4096];  /* EXIT_FILE.w */
static long early_fd = -1;

/* Ends a wrapper whose command ended: one it stopped at its limit takes what is left of its group along. */
static void __attribute__((noreturn)) finish(int code, int stopped) {
    if (stopped) sys(SYS_KILL, 0, SIG_KILL, 0, 0);
    leave(code);
}

/* Ends a wrapper that never ran its command: no exit file is left, early or not. */
static void __attribute__((noreturn)) quit(int code) {
    if (early_fd >= 0) sys(SYS_UNLINK, (long)early, 0, 0, 0);
    leave(code);
}

__attribute__((used)) void __attribute__((noreturn)) wrapper_main(long *stack) {
    int argc = (int)stack[0];
    char **argv = (char **)(stack + 1), **envp = argv + argc + 1;
    if (argc < 4) {
        say("aipm-wrapper: ", "usage", "aipm-wrapper EXIT_FILE LIMIT PROGRAM [ARG...]", "");
        leave(2);
    }
    long limit = 0;
    for (const char *c = argv[2]; *c >= '0' && *c <= '9' && limit < 100000000; c++) limit = limit * 10 + (*c - '0');
    const char *root = getenv_(envp, "AIPM_ROOT");
    if (!root || sys(SYS_CHDIR, (long)root, 0, 0, 0) < 0) leave(126);
    long elen = length(argv[1]);
    if (elen + 3 <= (long)sizeof early) {  /* after the chdir: a relative EXIT_FILE means the same all along */
        for (long i = 0; i < elen; i++) early[i] = argv[1][i];
        early[elen] = '.', early[elen + 1] = 'w', early[elen + 2] = 0;
        early_fd = sys(SYS_OPEN, (long)early, O_WRONLY_ | O_CREAT_ | O_TRUNC_ | O_NOFOLLOW_ | O_CLOEXEC_, 0666, 0);
    }
    char go[3];
    long got = 0;
    while (got < 3) {
        long r = sys(SYS_READ, 3, (long)(go + got), 3 - got, 0);
        if (r == -E_INTR) continue;
        if (r <= 0) quit(125);  /* EOF: the launcher died before recording this worker */
        got += r;
    }
    if (go[0] != 'g' || go[1] != 'o' || go[2] != '\n') quit(125);
    sys(SYS_CLOSE, 3, 0, 0, 0);
    /* From the go on, a stop signal to the group (SIGTERM, SIGINT, SIGHUP) waits, blocked, until the wrapper exits:
     * the wrapper goes when its command has gone, so the stopper's grace is the command's (as the shell wrapper's
     * `trap :`). Blocked before the fork and let through again in the child, which starts as the command would. */
    static const unsigned long stops = (1UL << (1 - 1)) | (1UL << (2 - 1)) | (1UL << (15 - 1));
    sys(SYS_RT_SIGPROCMASK, 0 /* SIG_BLOCK */, (long)&stops, 0, sizeof stops);
    int status = 0, stopped = 0;
    long r = 0;
    int native = builtin(argv[3]);
    if (native >= 0) {
        status = native << 8;  /* as the shell's builtin: no process of its own, whatever the arguments */
    } else {
        long pid = sys(SYS_FORK, 0, 0, 0, 0);
        if (pid < 0) quit(126);
        if (pid == 0) {
            sys(SYS_RT_SIGPROCMASK, 1 /* SIG_UNBLOCK */, (long)&stops, 0, sizeof stops);
            run(argv + 3, envp);
        }
        r = reap(pid, limit, argv[3], &status, &stopped);
    }
    int code = r < 0 ? 126 : (status & 0x7f) ? 128 + (status & 0x7f) : (status >> 8) & 0xff;
    static const char mark[] = " timed-out";  /* runtime.read_exit_file */
    char text[4 + sizeof mark + 26];
    int sig = r >= 0 ? status & 0x7f : 0;
    if (sig && sig != 2 && sig != 13) {  /* as dash says "Terminated" (not for SIGINT, SIGPIPE) */
        decimal(sig, text);
        say("aipm-wrapper: ", argv[3], "killed by signal ", text);
    }
    int n = decimal(code, text), digits = n;
    for (int i = 0; stopped && mark[i]; i++) text[n++] = mark[i];
    long now[2];  /* its end on the boot clock, " @S.CC": one that ended past its owner's limit is no success */
    if (limit > 0 && sys(SYS_CLOCK_GETTIME, CLOCK_BOOTTIME_, (long)now, 0, 0) == 0) {
        text[n++] = ' ', text[n++] = '@';
        n += decimal(now[0], text + n);
        text[n++] = '.', text[n++] = (char)('0' + now[1] / 100000000), text[n++] = (char)('0' + now[1] / 10000000 % 10);
    }
    text[n++] = '\n';
    if (early_fd >= 0) {
        if (sys(SYS_WRITE, early_fd, (long)text, n, 0) == n && sys(SYS_RENAME, (long)early, (long)argv[1], 0, 0) == 0)
            finish(code, stopped);
        sys(SYS_UNLINK, (long)early, 0, 0, 0);  /* a full disk, or removed meanwhile: the exit file as before */
    }
    long fd = sys(SYS_OPEN, (long)argv[1], O_WRONLY_ | O_CREAT_ | O_TRUNC_ | O_CLOEXEC_, 0666, 0);
    if (fd >= 0) {
        long written = sys(SYS_WRITE, fd, (long)text, n, 0);
        sys(SYS_CLOSE, fd, 0, 0, 0);
        if (written == n) finish(code, stopped);
    }
    /* Its directory removed (the command's `rm -rf` of aipm's state), or the file made but its code refused (a full
     * disk): the log, last, has the code, as the shell wrapper's `echo ... || echo` leaves it. */
    text[digits] = 0;
    say("aipm-wrapper: ", argv[3], "exit file not written; exit code ", text);
    finish(code, stopped);
}

/* The kernel enters with argc, argv and envp on the stack; the call leaves it aligned as the ABI wants. */
__asm__(".globl _start\n_start:\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call wrapper_main\n  hlt\n");
