"""When refreshes run: APScheduler inside `prefloop serve` (or `prefloop worker`).

- the scheduled trigger: a crontab line (`PREFLOOP_REFRESH_CRON`, nightly at 03:00 by default,
  in `PREFLOOP_REFRESH_TIMEZONE`) refreshes every segment that has approved pairs;
- the threshold trigger: every `PREFLOOP_REFRESH_CHECK_SECONDS` new feedback is compiled and
  a segment with at least `PREFLOOP_REFRESH_THRESHOLD_PAIRS` approved pairs waiting is refreshed,
  at most once per `PREFLOOP_REFRESH_MIN_INTERVAL_MINUTES`;
- operators start one by hand (`POST /v1/operator/runs`, `prefloop refresh`).

Every replica may run a scheduler: the database lease in `service.loop.lease` lets one refresh run
at a time fleet-wide, and the others record theirs as skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func
from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from adapters.registry import Registry
from service.core.config import Settings
from service.core.errors import ConflictError
from service.feedback import compile_and_store
from service.loop.refresh import run_refresh
from service.loop.runs import FINISHED, create_run, request_cancel
from service.storage.tables import Feedback, Message, PreferencePair, TrainingRun, utcnow

log = logging.getLogger(__name__)


def waiting_pairs(db: Database) -> dict[str, int]:
    """Approved training items not yet used, per segment: pairs and lone thumbs (KTO rows)."""
    with Session(db) as s:
        rows = s.exec(
            select(PreferencePair.segment, func.count())
            .where(PreferencePair.status == "approved")
            .group_by(PreferencePair.segment)
        ).all()
    return dict(rows)


class Refresher:
    """Starts refreshes, one at a time in this process, on a worker thread."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        registry: Registry,
        on_promote: Callable[[], None] | None = None,
        gpu_guard: Callable[[], AbstractContextManager] | None = None,
    ):
        self.settings, self.db, self.registry, self.on_promote = settings, db, registry, on_promote
        self.gpu_guard = gpu_guard  # pauses serving on the GPU while a refresh trains (vLLM)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refresh")
        self._current: str | None = None
        self._lock = threading.Lock()
        self.scheduler: BackgroundScheduler | None = None
        self._compiled_mark: tuple | None = None  # the signals the last threshold check saw

    @property
    def current(self) -> str | None:
        """The run this process is executing, if any."""
        return self._current

    # --- starting runs -------------------------------------------------------------------
    def start(self, segment: str, *, trigger: str, actor: str) -> TrainingRun:
        """Queue a refresh and return its row at once; 409 when this process runs one."""
        with self._lock:
            if self._current is not None:
                raise ConflictError(
                    f"refresh {self._current} is still running; cancel it or wait",
                    code="refresh_running",
                )
            run = create_run(self.db, segment=segment, trigger=trigger, actor=actor)
            self._current = run.id
        self._executor.submit(self._run, run.id)
        return run

    def run_now(self, segment: str, *, trigger: str, actor: str) -> TrainingRun | None:
        """Run a refresh in the calling thread (the scheduler's jobs); None if one is running."""
        with self._lock:
            if self._current is not None:
                return None
            run = create_run(self.db, segment=segment, trigger=trigger, actor=actor)
            self._current = run.id
        return self._run(run.id)

    def _run(self, run_id: str) -> TrainingRun:
        try:
            return run_refresh(
                self.settings,
                self.db,
                self.registry,
                run_id,
                on_promote=self.on_promote,
                gpu_guard=self.gpu_guard,
            )
        finally:
            with self._lock:
                self._current = None

    # --- the triggers --------------------------------------------------------------------
    def scheduled(self) -> None:
        segments = set(waiting_pairs(self.db)) or {"default"}
        for segment in sorted(segments):
            self.run_now(segment, trigger="schedule", actor="scheduler")

    def check_threshold(self) -> None:
        # Compiling reads every signal (about 1 s of CPU at 40k feedback rows, holding the
        # process's one SQLite connection): only when a vote or a kept answer changed since.
        mark = self._signals_mark()
        if mark != self._compiled_mark:
            try:
                compile_and_store(self.db, self.settings, actor="scheduler")
            except ConflictError:  # another process compiled at the same moment; next time
                return
            self._compiled_mark = mark
        for segment, waiting in sorted(waiting_pairs(self.db).items()):
            if waiting < self.settings.refresh_threshold_pairs or self._too_soon(segment):
                continue
            log.info("threshold refresh for %s: %d approved items waiting", segment, waiting)
            self.run_now(segment, trigger="threshold", actor="scheduler")

    def _signals_mark(self) -> tuple:
        with Session(self.db) as s:
            votes = s.exec(select(func.count(), func.max(Feedback.updated_at))).one()
            kept = s.exec(select(func.max(Message.kept_at))).one()
        return (*votes, kept)

    def _too_soon(self, segment: str) -> bool:
        since = utcnow() - timedelta(minutes=self.settings.refresh_min_interval_minutes)
        with Session(self.db) as s:
            recent = s.exec(
                select(TrainingRun.id).where(
                    TrainingRun.segment == segment,
                    TrainingRun.trigger == "threshold",
                    col(TrainingRun.status).in_([*FINISHED, "running"]),
                    TrainingRun.status != "skipped",
                    TrainingRun.created_at >= since,
                )
            ).first()
        return recent is not None

    def start_schedule(self) -> None:
        s = self.settings
        scheduler = BackgroundScheduler(timezone=s.refresh_timezone)
        scheduler.add_job(
            self.scheduled,
            CronTrigger.from_crontab(s.refresh_cron, timezone=s.refresh_timezone),
            id="scheduled-refresh",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=3600,
        )
        scheduler.add_job(
            self.check_threshold,
            "interval",
            seconds=s.refresh_check_seconds,
            id="threshold-refresh",
            max_instances=1,
            coalesce=True,
        )
        scheduler.start()
        self.scheduler = scheduler
        log.info(
            "refresh scheduler: %r (%s), threshold %d items checked every %.0f s",
            s.refresh_cron,
            s.refresh_timezone,
            s.refresh_threshold_pairs,
            s.refresh_check_seconds,
        )

    def shutdown(self) -> None:
        """Stop the triggers; a running refresh is cancelled (its subprocess terminated) so the
        process can exit now. Its run is recorded as cancelled."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self._current is not None:
            request_cancel(self.db, self._current)
        self._executor.shutdown(wait=True, cancel_futures=True)
