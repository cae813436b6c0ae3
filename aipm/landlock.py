"""Linux Landlock as confine.py uses it: the rights it handles, the kernel's ABI, and restricting this process.

The binding is landlockpy (installed on Linux only); AIPM_FAKE_LANDLOCK_ABI stands in for the kernel's answer
in tests.
"""

from __future__ import annotations

import os


# Test seam (like AIPM_FAKE_LOAD in resources.py): a Landlock ABI to report instead of asking the kernel;
# "0" simulates a kernel without Landlock. Read only here.
FAKE_ABI = "AIPM_FAKE_LANDLOCK_ABI"
MIN_ABI = 3  # ABI 3 (Linux 6.2) adds control of truncate(2); without it "cannot truncate" would not hold

# LANDLOCK_ACCESS_FS_* (linux/landlock.h)
WRITE_FILE, REMOVE_DIR, REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = (1 << n for n in range(6, 13))
REFER, TRUNCATE = 1 << 13, 1 << 14
FILE_RIGHTS = WRITE_FILE | TRUNCATE  # the only handled rights a rule on a file may carry
ALL_RIGHTS = (FILE_RIGHTS | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO
              | MAKE_BLOCK | MAKE_SYM | REFER)


def abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none."""
    fake = os.environ.get(FAKE_ABI)
    if fake is not None:
        return int(fake)
    try:
        import landlockpy
    except ImportError:  # not Linux: the binding is not installed there
        return 0
    return landlockpy.abi_version()


def unavailable() -> str | None:
    """Why confinement cannot be had on this machine, in one line; None when it can."""
    try:
        version = abi()
    except (OSError, ValueError) as exc:
        version, detail = 0, f" ({exc})"
    else:
        detail = ""
    if version == 0:
        return (f"this kernel has no Landlock{detail}: it needs Linux 5.13+ with `landlock` in the boot "
                "parameter lsm=...; run the task without confine")
    if version < MIN_ABI:
        return (f"this kernel's Landlock ABI is {version}; confining truncation needs ABI {MIN_ABI} "
                "(Linux 6.2+); run the task without confine")
    return None


def restrict(grants: list) -> None:
    import landlockpy
    from landlockpy import AccessFS, AccessNet, Ruleset, Scope

    # Where the kernel can (ABI 6), no signal leaves the worker's processes: it cannot kill its wrapper and its
    # owner to have a forged outcome adopted, nor stop another worker or aipm.
    scoped = landlockpy.scope_for_abi(abi()) & Scope.SIGNAL
    with Ruleset(handled_fs=AccessFS(ALL_RIGHTS), handled_net=AccessNet.NONE, scoped=scoped,
                 best_effort=False) as ruleset:
        for path, rights in grants:
            try:
                ruleset.allow_path(path, AccessFS(rights))
            except (FileNotFoundError, PermissionError):
                continue  # vanished meanwhile, or out of our reach anyway: nothing to grant
            except landlockpy.LandlockError as exc:
                raise OSError(exc.errno, f"cannot grant {path}: {exc.strerror}") from None
        ruleset.restrict()
