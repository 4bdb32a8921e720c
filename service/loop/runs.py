"""A refresh's record: the `TrainingRun` row it writes as it goes (steps, timings, progress,
outcome), the operator's cancel flag, and the sweep of runs a crashed process left behind."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from adapters.registry import as_utc
from service.loop.lease import HOLDER, LEASE, dead_holder
from service.storage.tables import Lease, TrainingRun, utcnow

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "skipped", "failed", "cancelled")


class RefreshSkipped(Exception):
    """Nothing to do (too few pairs, another refresh running): not a failure."""


class RefreshCancelled(Exception):
    pass


class LeaseLost(RuntimeError):
    """The refresh lease went to another process: stop before changing anything else."""


def create_run(db: Database, *, segment: str, trigger: str, actor: str) -> TrainingRun:
    with Session(db, expire_on_commit=False) as s:
        run = TrainingRun(segment=segment, trigger=trigger, actor=actor)
        s.add(run)
        s.commit()
        return run


def get_run(db: Database, run_id: str) -> TrainingRun | None:
    with Session(db, expire_on_commit=False) as s:
        return s.get(TrainingRun, run_id)


def request_cancel(db: Database, run_id: str) -> TrainingRun | None:
    """Ask a run to stop; the process running it notices within a second."""
    with Session(db, expire_on_commit=False) as s:
        run = s.get(TrainingRun, run_id)
        if run is None or run.status in FINISHED:
            return run
        run.cancel_requested = True
        s.add(run)
        s.commit()
        return run


class Recorder:
    """Writes a run's progress to its row, one short transaction at a time."""

    def __init__(self, db: Database, run_id: str, holder: str = HOLDER, failpoint: str = ""):
        self.db, self.run_id, self.holder, self.failpoint = db, run_id, holder, failpoint
        self.steps: list[dict[str, Any]] = []
        self._checked, self._cancel = 0.0, False
        self.lease_lost = threading.Event()  # set by the heartbeat: another process may run

    def check_lease(self) -> None:
        if self.lease_lost.is_set():
            raise LeaseLost(
                "this refresh lost its lease (its renewals failed for "
                "PREFLOOP_REFRESH_LEASE_SECONDS, so another process may be refreshing); it "
                "stopped without changing anything further"
            )

    def update(self, **fields: Any) -> None:
        with Session(self.db) as s:
            s.exec(update(TrainingRun).where(col(TrainingRun.id) == self.run_id).values(**fields))
            s.commit()

    def cancelled(self) -> bool:
        if not self._cancel and time.monotonic() - self._checked > 0.5:
            self._checked = time.monotonic()
            with Session(self.db) as s:
                self._cancel = bool(
                    s.exec(
                        select(TrainingRun.cancel_requested).where(TrainingRun.id == self.run_id)
                    ).one()
                )
        return self._cancel

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Record a step; the caller fills the yielded dict with what it found."""
        if self.cancelled():
            raise RefreshCancelled(f"cancelled before {name}")
        self.check_lease()
        detail: dict[str, Any] = {}
        entry = {"name": name, "started_at": utcnow().isoformat(), "seconds": None}
        self.steps.append(entry)
        self.update(stage=name, steps=list(self.steps))
        if self.failpoint == f"refresh:{name}":  # crash tests (PREFLOOP_FAILPOINT)
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        try:
            yield detail
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            if detail:
                entry["detail"] = detail
            self.update(steps=list(self.steps))
            log.info("refresh %s: %s took %.1f s %s", self.run_id, name, entry["seconds"], detail)


def sweep_interrupted(db: Database, ttl: float) -> list[str]:
    """At start-up: runs left `running` or `queued` by a process that died (SIGKILL, a power
    cut) are marked failed, and a lease such a process of this host held is freed, so the next
    refresh need not wait for it to expire. A run whose holder still holds a live lease (another
    replica) is left alone. Returns the swept run ids."""
    now = utcnow()
    with Session(db) as s:
        lease = s.get(Lease, LEASE)
        live = None
        if lease is not None and as_utc(lease.expires_at) > now:
            live = None if dead_holder(lease.holder) else lease.holder
            if live is None:
                s.delete(lease)
        swept = []
        stale_queued = now - timedelta(seconds=ttl)
        for run in s.exec(
            select(TrainingRun).where(col(TrainingRun.status).in_(["running", "queued"]))
        ):
            if run.status == "queued" and as_utc(run.created_at) > stale_queued:
                continue  # just queued, by a live process: it starts within a moment
            if run.status == "running" and run.holder is not None and run.holder == live:
                continue
            run.status = "failed"
            run.error = (
                f"interrupted at {run.stage or 'its start'}: the process running it "
                f"({run.holder or 'unknown'}) stopped before it finished; found at start-up. "
                "Nothing it had not committed was kept; start a new run."
            )
            run.finished_at = now
            s.add(run)
            swept.append(run.id)
        s.commit()
    if swept:
        log.warning("marked %d interrupted refresh run(s) failed: %s", len(swept), swept)
    return swept
