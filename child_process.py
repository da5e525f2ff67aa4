"""Child processes that never outlive their parent (Linux).

`die_with_parent` is a `subprocess.Popen(preexec_fn=...)`: it runs in the child between fork and
exec and asks the kernel for SIGKILL when the parent dies (PR_SET_PDEATHSIG), however it dies,
SIGKILL and the OOM killer included. The signal comes when the *thread* that started the child
ends, so start such children from a thread that lives as long as its process (the main thread,
an event loop's). `become_subreaper` keeps a process's orphaned descendants its own, to end them.
Elsewhere than Linux both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper() -> None:
    """Make this process the one that adopts its orphaned descendants (PR_SET_CHILD_SUBREAPER), so
    that a child whose parent died first is still found among this process's children."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
