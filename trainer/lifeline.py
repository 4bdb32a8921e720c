"""Training subprocesses die with the server that started them.

A refresh runs `python -m trainer ...` (or torchrun, which starts one per GPU). If the server is
killed (SIGKILL, the OOM killer), nothing would stop them: they would go on holding the GPU and
write into a run nobody watches. Linux's parent-death signal closes that gap:
`python -m trainer.lifeline PID CMD...` asks for SIGKILL when its parent dies, checks the parent
is still PID (it may have died before the request), then becomes CMD (exec keeps the setting).
Processes that CMD starts (torchrun's workers) inherit PREFLOOP_DIE_WITH_PARENT and make the same
request for themselves in `trainer.__main__`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
ENV = "PREFLOOP_DIE_WITH_PARENT"


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere a no-op),
    and exit now if the parent already has (re-parented to another pid)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # not permitted here: the process group kill in service.loop.refresh still applies
    parent = os.getppid()
    if (expected_parent is not None and parent != expected_parent) or parent == 1:
        os._exit(1)


def wrap(cmd: list[str]) -> list[str]:
    """`cmd`, run so that it dies with this process."""
    return [sys.executable, "-m", "trainer.lifeline", str(os.getpid()), *cmd]


if __name__ == "__main__":
    die_with_parent(int(sys.argv[1]))
    os.environ[ENV] = "1"
    os.execv(sys.argv[2], sys.argv[2:])
