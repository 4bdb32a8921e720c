"""Starting the trainer for a refresh, and waiting for it.

A training or evaluation is a `Launch`: one local subprocess (`python -m trainer`, or torchrun
on this machine), the pods of a rendered Kubernetes Job run here as processes, or that Job on a
cluster (`service.loop.trainjob`). Whichever it is, `wait_for` watches it the same way: it
mirrors the trainer's progress from its metrics.jsonl (on shared storage for a Job) and the log
tail into the run's row, stops it on a cancel request, a lost lease or the time limit, and turns
a failure into an error that carries the log tail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from service.loop.runs import RefreshCancelled
from trainer import lifeline


class Watcher(Protocol):
    """What a wait reports to and checks: the refresh's `Recorder`."""

    lease_lost: threading.Event

    def cancelled(self) -> bool: ...

    def check_lease(self) -> None: ...

    def update(self, **fields: Any) -> None: ...


class Launch(Protocol):
    """A started trainer: `poll` says whether it has finished, `error` why it failed (None when
    it succeeded), `stop` ends it early, `close` lets go of what it holds (always called)."""

    def poll(self) -> bool: ...

    def error(self) -> str | None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


# --- the trainer's command line ---------------------------------------------------------------


def _train_flags(train: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in train.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list | tuple):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def trainer_launcher(nproc: int = 1) -> list[str]:
    """`python -m trainer`, or with several processes (one per GPU) the same under torchrun,
    which starts them, sets RANK/WORLD_SIZE for `trainer.distributed`, and stops them all if one
    fails. `--standalone`: a rendezvous on this machine, on a free port."""
    if nproc <= 1:
        return [sys.executable, "-m", "trainer"]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), "-m", "trainer",
    ]  # fmt: skip


# A Python exception's last traceback line, or the trainer's "error: ..." (after a pod prefix).
_CAUSE = re.compile(r"(?:^|\] )((?:[\w.]*(?:Error|Exception)|error): .*)")


def cause(lines: Sequence[str]) -> str | None:
    """Why a process failed, from its log: the last error line that is not torchrun's own
    summary (which says only that a worker failed)."""
    for line in reversed(list(lines)):  # a copy: a reader thread may still append
        if (m := _CAUSE.search(line)) and "ChildFailedError" not in line:
            return m[1]
    return None


def describe(cmd: Sequence[str]) -> str:
    """A command's name in failure messages: `trainer train`, `trainer evaluate`, also under
    torchrun."""
    return " ".join(cmd[cmd.index("trainer") :][:2]) if "trainer" in cmd else cmd[0]


# --- local processes --------------------------------------------------------------------------


class Process:
    """One local trainer process (torchrun and its workers: one process group), its output
    read line by line into `log_lines`, each line after `prefix`."""

    def __init__(
        self,
        cmd: list[str],
        log_lines: deque[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        prefix: str = "",
    ) -> None:
        log_lines.append(f"{prefix}$ " + " ".join(cmd))
        self.proc = subprocess.Popen(
            lifeline.wrap(cmd),  # dies with this process, even on SIGKILL (trainer.lifeline)
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            # Passive OpenMP waits: the training shares the CPU with serving (see service.cli).
            env={
                **os.environ,
                **(env or {}),
                "PYTHONUNBUFFERED": "1",
                "OMP_WAIT_POLICY": "PASSIVE",
            },
            start_new_session=True,  # its own process group: stopping it stops torchrun's workers
        )
        self.lines: deque[str] = deque(maxlen=100)  # its own tail, for `cause`
        self.reader = threading.Thread(target=self._read, args=(log_lines, prefix), daemon=True)
        self.reader.start()

    def _read(self, log_lines: deque[str], prefix: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip()[:500])
            log_lines.append(prefix + self.lines[-1])

    def poll(self) -> bool:
        return self.proc.poll() is not None

    def error(self) -> str | None:
        code = self.proc.returncode
        if code is None or code == 0:
            return None
        if code < 0:  # killed: the kernel's OOM killer, or someone's SIGKILL
            return f"was killed by signal {-code} (out of memory, or stopped from outside)"
        return f"exited with {code}"

    def stop(self) -> None:
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        self.reader.join(timeout=5)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # already gone
        pass


# --- waiting ----------------------------------------------------------------------------------


def wait_for(
    launch: Launch,
    rec: Watcher,
    *,
    what: str,
    log_lines: deque[str],
    progress_files: list[Path] | None = None,
    timeout: float | None = None,
) -> None:
    """Wait for a started trainer, mirroring its progress and log tail into the run; a cancel
    request stops it, and so does running past `timeout` seconds (a failure)."""
    deadline = time.monotonic() + timeout if timeout else None
    last: dict[str, Any] = {}
    try:
        while not launch.poll():
            time.sleep(0.5)
            if rec.cancelled():
                launch.stop()
                raise RefreshCancelled("cancelled by an operator")
            if rec.lease_lost.is_set():
                launch.stop()
                rec.check_lease()
            if deadline is not None and time.monotonic() > deadline:
                launch.stop()
                rec.update(log="\n".join(log_lines))
                raise RuntimeError(
                    f"{what} ran past its {timeout:.0f} s limit and was stopped "
                    "(PREFLOOP_REFRESH_TRAIN_TIMEOUT_MINUTES)"
                )
            progress = _read_progress(progress_files) if progress_files else None
            if progress and progress != last:
                last = progress
                rec.update(progress=progress, log="\n".join(log_lines))
    finally:
        launch.close()
    progress = _read_progress(progress_files) if progress_files else None
    if progress:
        rec.update(progress=progress)
    rec.update(log="\n".join(log_lines))
    if (error := launch.error()) is not None:
        raise RuntimeError(f"{what} {error}: " + " | ".join(list(log_lines)[-3:]))


def run_subprocess(
    cmd: list[str],
    rec: Watcher,
    *,
    log_lines: deque[str],
    progress_files: list[Path] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> None:
    """Run a trainer command here and wait for it (`wait_for`)."""
    launch = Process(cmd, log_lines, cwd=cwd)
    wait_for(
        launch,
        rec,
        what=describe(cmd),
        log_lines=log_lines,
        progress_files=progress_files,
        timeout=timeout,
    )


# --- progress ---------------------------------------------------------------------------------

HISTORY_POINTS = 500


def _read_progress(paths: list[Path]) -> dict[str, Any] | None:
    """The trainer's latest step from its metrics.jsonl (in `.<out>.partial/` while training
    runs, inside the output once it is renamed into place)."""
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return None
    rows = []
    for line in path.read_text().splitlines():
        if '"split": "train"' in line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    if not rows:
        return None
    keep = ("step", "total", "epoch", "loss", "margin", "accuracy", "kto_gap", "lr")
    latest = {k: rows[-1][k] for k in keep if k in rows[-1]}
    # Every step's loss and reward margin, for the console's plot; thinned to at most
    # HISTORY_POINTS so a long run's row stays small.
    stride = -(-len(rows) // HISTORY_POINTS)
    picked = rows[::stride]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    # The fourth column, the thumbs reward gap, is None on steps without ups and downs.
    latest["history"] = [
        [r.get("step"), r.get("loss"), r.get("margin"), r.get("kto_gap")] for r in picked
    ]
    return latest
