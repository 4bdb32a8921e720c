"""One refresh: the loop the service exists for, as one recorded run.

    compile new feedback into pairs -> select this segment's approved pairs (a seeded share held
    out for the gate) -> train a LoRA DPO update in a subprocess, warm-started from the active
    adapter -> register it -> evaluate it against the active one in a subprocess -> gate ->
    promote (replicas swap it in) or reject -> mark the pairs used

Training and evaluation run as subprocesses (`python -m trainer ...`), so a crash or an
out-of-memory kills that process, not the server, and GPU memory is released when it exits.
Every step, its timing, the training progress and the subprocesses' log tail are written to the
`TrainingRun` row as they happen. A database lease keeps one refresh running at a time across
every replica and worker; the holder renews it while it works, so a crashed holder's lease
simply expires. Any failure leaves the active adapter as it was and the run `failed` with its
reason; cancelling (the operator API sets a flag) stops the subprocess at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from adapters.registry import APPROVED, AdapterVersion, Registry, as_utc
from service.core.config import Settings
from service.core.errors import ConflictError
from service.loop.compile import compile_and_store, to_trainer
from service.loop.lifecycle import base_model_path, canary_for, golden_for, judge
from service.storage.models import Lease, PreferencePair, TrainingRun, utcnow
from trainer import lifeline
from trainer import pairs as tp
from trainer.golden import save_golden

log = logging.getLogger(__name__)

LEASE = "refresh"
HOLDER = f"{socket.gethostname()}:{os.getpid()}"
FINISHED = ("succeeded", "skipped", "failed", "cancelled")


class RefreshSkipped(Exception):
    """Nothing to do (too few pairs, another refresh running): not a failure."""


class RefreshCancelled(Exception):
    pass


class LeaseLost(RuntimeError):
    """The refresh lease went to another process: stop before changing anything else."""


# --- the lease --------------------------------------------------------------------------------


def acquire_lease(db: Database, holder: str, ttl: float, name: str = LEASE) -> str | None:
    """Take the lease if it is free, expired or already ours; returns None on success, else who
    holds it.

    Taking an existing row is one conditional UPDATE, so two processes racing for an expired
    lease cannot both win: on Postgres the second UPDATE waits for the first's row lock, then
    finds the row no longer expired; on SQLite transactions are serialized (BEGIN IMMEDIATE).
    Creating the row races on its primary key instead."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl)
    with Session(db) as s:
        taken = s.exec(
            update(Lease)
            .where(
                col(Lease.name) == name,
                or_(col(Lease.holder) == holder, col(Lease.expires_at) <= now),
            )
            .values(holder=holder, expires_at=expires, acquired_at=now)
        ).rowcount
        if taken:
            s.commit()
            return None
        row = s.get(Lease, name)
        if row is not None:
            return f"{row.holder} (until {as_utc(row.expires_at).isoformat(timespec='seconds')})"
        s.add(Lease(name=name, holder=holder, expires_at=expires, acquired_at=now))
        try:
            s.commit()
        except IntegrityError:  # another process inserted it first
            return "another process"
    return None


def renew_lease(db: Database, holder: str, ttl: float, name: str = LEASE) -> bool:
    with Session(db) as s:
        result = s.exec(
            update(Lease)
            .where(col(Lease.name) == name, col(Lease.holder) == holder)
            .values(expires_at=utcnow() + timedelta(seconds=ttl))
        )
        s.commit()
        return result.rowcount == 1


def release_lease(db: Database, holder: str, name: str = LEASE) -> None:
    with Session(db) as s:
        row = s.get(Lease, name)
        if row is not None and row.holder == holder:
            s.delete(row)
            s.commit()


def _dead_holder(holder: str | None) -> bool:
    """A holder ("host:pid") that is this process just started, or a process of this host that
    no longer exists."""
    if holder is None or holder == HOLDER:
        return True
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


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
            live = None if _dead_holder(lease.holder) else lease.holder
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


# --- run records ------------------------------------------------------------------------------


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


# --- subprocesses -----------------------------------------------------------------------------


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


def run_subprocess(
    cmd: list[str],
    rec: Recorder,
    *,
    log_lines: deque[str],
    progress_files: list[Path] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> None:
    """Run a trainer command, mirroring its progress and log tail into the run; a cancel
    request terminates it, and so does running past `timeout` seconds (a failure)."""
    log_lines.append("$ " + " ".join(cmd))
    # "trainer train" / "trainer evaluate", also under torchrun, for the failure messages.
    what = " ".join(cmd[cmd.index("trainer") :][:2]) if "trainer" in cmd else cmd[0]
    proc = subprocess.Popen(
        lifeline.wrap(cmd),  # dies with this process, even on SIGKILL (trainer.lifeline)
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        # Passive OpenMP waits: the training shares the CPU with serving (see service.cli).
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"},
        start_new_session=True,  # its own process group: stopping it stops torchrun's workers
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log_lines.append(line.rstrip()[:500])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    last_progress: dict[str, Any] = {}
    deadline = time.monotonic() + timeout if timeout else None

    def stop() -> None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    while proc.poll() is None:
        time.sleep(0.5)
        if rec.cancelled():
            stop()
            raise RefreshCancelled("cancelled by an operator")
        if rec.lease_lost.is_set():
            stop()
            rec.check_lease()
        if deadline is not None and time.monotonic() > deadline:
            stop()
            rec.update(log="\n".join(log_lines))
            raise RuntimeError(
                f"{what} ran past its {timeout:.0f} s limit and was stopped "
                "(PREFLOOP_REFRESH_TRAIN_TIMEOUT_MINUTES)"
            )
        progress = _read_progress(progress_files) if progress_files else None
        if progress and progress != last_progress:
            last_progress = progress
            rec.update(progress=progress, log="\n".join(log_lines))
    reader.join(timeout=5)
    if progress_files:
        progress = _read_progress(progress_files)
        if progress:
            rec.update(progress=progress)
    rec.update(log="\n".join(log_lines))
    if proc.returncode != 0:
        tail = " | ".join(list(log_lines)[-3:])
        if proc.returncode < 0:  # killed: the kernel's OOM killer, or someone's SIGKILL
            raise RuntimeError(
                f"{what} was killed by signal {-proc.returncode} (out of memory, or stopped "
                f"from outside): {tail}"
            )
        raise RuntimeError(f"{what} exited with {proc.returncode}: {tail}")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # already gone
        pass


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


# --- the refresh ------------------------------------------------------------------------------


def _heldout(key: str, fraction: float) -> bool:
    """A stable split: a pair is held out (or not) whichever refresh sees it."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


@dataclass
class TrainingSets:
    """A refresh's data as trainer rows: what it trains on and what the gate judges it by."""

    train: list[dict[str, Any]]
    heldout_pairs: list[dict[str, Any]]
    heldout_unpaired: list[dict[str, Any]]
    counts: dict[str, int]


def training_sets(
    items: Sequence[tp.PreferencePair | tp.UnpairedExample], settings: Settings
) -> TrainingSets:
    """Split a segment's approved items (a seeded share held out for the gate, stable across
    refreshes), then, on each side, join lone thumbs into matched pairs (`match_thumbs`).
    Pairs train with the configured DPO-family loss and the remaining thumbs with KTO."""
    fraction, window = settings.refresh_heldout_fraction, settings.refresh_match_window_hours
    sides: dict[bool, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    counts: dict[str, int] = {}
    for held in (False, True):
        mine = [x for x in items if _heldout(x.key, fraction) == held]
        pairs = [x for x in mine if isinstance(x, tp.PreferencePair)]
        singles = [x for x in mine if isinstance(x, tp.UnpairedExample)]
        matched, rest = tp.match_thumbs(singles, window)
        sides[held] = (
            [tp.dpo_row(x) for x in pairs + matched],
            [tp.kto_row(x) for x in rest],
        )
        prefix = "heldout_" if held else ""
        counts |= {
            f"{prefix}pairs": len(pairs),
            f"{prefix}matched": len(matched),
            f"{prefix}thumbs_up": sum(x.label for x in rest),
            f"{prefix}thumbs_down": sum(not x.label for x in rest),
        }
    train = sides[False][0] + sides[False][1]
    return TrainingSets(train, sides[True][0], sides[True][1], counts)


def run_refresh(
    settings: Settings,
    db: Database,
    registry: Registry,
    run_id: str,
    *,
    on_promote: Callable[[], None] | None = None,
    holder: str = HOLDER,
    gpu_guard: Callable[[], AbstractContextManager] | None = None,
) -> TrainingRun:
    """Run one queued refresh to its end; the row says how it went. Never raises for a failed
    refresh (the row is marked failed with the reason)."""
    rec = Recorder(db, run_id, holder, settings.failpoint)
    run = get_run(db, run_id)
    assert run is not None, run_id
    ttl = settings.refresh_lease_seconds
    held_by = acquire_lease(db, holder, ttl)
    if held_by is not None:
        rec.update(
            status="skipped",
            error=f"another refresh is running (lease held by {held_by})",
            finished_at=utcnow(),
        )
        return get_run(db, run_id)  # type: ignore[return-value]

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl / 3):
            if not renew_lease(db, holder, ttl):
                log.error("refresh %s lost its lease: stopping it", run_id)
                rec.lease_lost.set()  # the next step, or the running subprocess, stops
                return

    beat = threading.Thread(target=heartbeat, name="refresh-lease", daemon=True)
    beat.start()
    rec.update(status="running", started_at=utcnow(), holder=holder)
    log_lines: deque[str] = deque(maxlen=200)
    gpu = contextlib.ExitStack()  # what _refresh holds on the GPU; let go of whatever happens
    guard = gpu_guard or (lambda: serving_paused(settings))
    try:
        outcome = _refresh(settings, db, registry, run, rec, log_lines, on_promote, (gpu, guard))
        rec.update(status="succeeded", outcome=outcome, stage=None)
    except RefreshSkipped as exc:
        rec.update(status="skipped", error=str(exc), stage=None)
    except RefreshCancelled as exc:
        rec.update(status="cancelled", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the run records why; the service goes on
        log.exception("refresh %s failed", run_id)
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        gpu.close()
        stop.set()
        release_lease(db, holder)
        rec.update(finished_at=utcnow(), log="\n".join(log_lines))
    return get_run(db, run_id)  # type: ignore[return-value]


def _refresh(
    settings: Settings,
    db: Database,
    registry: Registry,
    run: TrainingRun,
    rec: Recorder,
    log_lines: deque[str],
    on_promote: Callable[[], None] | None,
    gpu: tuple[contextlib.ExitStack, Callable[[], AbstractContextManager]],
) -> str:
    segment = run.segment
    work = settings.home_dir / "runs" / run.id
    work.mkdir(parents=True, exist_ok=True)

    with rec.step("compile") as d:
        summary = compile_and_store(db, settings, actor=f"refresh {run.id}")
        d.update(new_pairs=summary.pairs, new_unpaired=summary.unpaired, excluded=summary.excluded)

    with rec.step("select") as d:
        rows = _approved(db, segment, settings.tenant_of(segment))
        sets = training_sets([to_trainer(r) for r in rows], settings)
        counts = {"approved": len(rows), "train": len(sets.train), **sets.counts}
        counts["heldout"] = len(sets.heldout_pairs) + len(sets.heldout_unpaired)
        d.update(counts)
        rec.update(counts=counts)
        if len(sets.train) < settings.refresh_min_pairs:
            raise RefreshSkipped(
                f"{len(sets.train)} approved training items in segment {segment!r} "
                f"({_describe(sets.counts)}); a refresh needs {settings.refresh_min_pairs} "
                "(PREFLOOP_REFRESH_MIN_PAIRS)"
            )
        tp.write_jsonl(sets.train, work / "train.jsonl")
        tp.write_jsonl(sets.heldout_pairs, work / "heldout.jsonl")
        tp.write_jsonl(sets.heldout_unpaired, work / "heldout_unpaired.jsonl")

    active = registry.active().get(segment)
    base = base_model_path(settings)
    rec.update(parent_version=active.id if active else None)
    out = work / "adapter"
    # Training and evaluation may share vLLM's GPU: pause it (PREFLOOP_VLLM_SLEEP_DURING_REFRESH)
    # until the evaluation is over; run_refresh wakes it if anything fails before then.
    gpu[0].enter_context(gpu[1]())
    with rec.step("train") as d:
        cmd = [
            *trainer_launcher(settings.refresh_train_nproc), "train",
            "--pairs", str(work / "train.jsonl"), "--base", str(base), "--out", str(out),
            "--no-progress",
            *_train_flags(
                {**settings.refresh_train, **settings.refresh_train_segments.get(segment, {})}
            ),
        ]  # fmt: skip
        if active is not None:  # warm start: the active adapter is the policy and reference
            cmd += ["--init-adapter", active.path]
        if settings.rehearsal_file is not None:
            cmd += ["--rehearsal-prompts", str(settings.rehearsal_file)]
        if out.exists():  # a retried run: resume its checkpoint, never overwrite a version
            cmd += ["--resume"]
        metrics = [work / ".adapter.partial" / "metrics.jsonl", out / "metrics.jsonl"]
        run_subprocess(
            cmd,
            rec,
            log_lines=log_lines,
            progress_files=metrics,
            timeout=settings.refresh_train_timeout_minutes * 60,
        )
        manifest = json.loads((out / "manifest.json").read_text())
        d.update(
            steps=manifest["metrics"]["steps"],
            seconds=manifest["metrics"]["seconds"]["total"],
            processes=manifest.get("world_size", 1),
        )

    with rec.step("register") as d:
        version = registry.register(
            out,
            segment=segment,
            base_model=str(base),
            parent=active.id if active else None,
            actor=f"refresh {run.id}",
            reason=f"trained by {run.id} on {_describe(sets.counts)}",
        )
        d.update(version=version.id)
        rec.update(candidate_version=version.id)

    with rec.step("evaluate") as d:
        cmd = [
            sys.executable, "-m", "trainer", "evaluate",
            "--base", str(base), "--candidate", version.path,
            "--out", str(work / "report.json"),
            "--max-new-tokens", str(settings.eval_max_new_tokens), "--no-progress",
            # The base's and the incumbent's greedy answers are the same every refresh.
            "--cache-dir", str(settings.home_dir / "cache" / "eval"),
        ]  # fmt: skip
        if active is not None:
            cmd += ["--incumbent", active.path]
        golden = golden_for(settings, segment)
        if golden:
            save_golden(work / "golden.jsonl", golden)
            cmd += ["--golden", str(work / "golden.jsonl")]
        if (canary := canary_for(settings, segment)) is not None:
            cmd += ["--canary", str(canary)]
        if sets.heldout_pairs:
            cmd += ["--pairs", str(work / "heldout.jsonl")]
        if sets.heldout_unpaired:
            cmd += ["--unpaired", str(work / "heldout_unpaired.jsonl")]
        run_subprocess(
            cmd, rec, log_lines=log_lines, timeout=settings.refresh_train_timeout_minutes * 60
        )
        report = json.loads((work / "report.json").read_text())
        d.update(seconds=report.get("seconds"), cached=report.get("cached", []))
    gpu[0].close()  # serving resumes before the gate and the promotion

    with rec.step("gate") as d:
        row, verdict = judge(
            settings, registry, version.id, report, active, actor=f"refresh {run.id}"
        )
        d.update(approved=verdict.approved, reasons=verdict.reasons)
        rec.update(verdict=verdict.to_json())
        _mark_used([r.id for r in rows], run.id, db)

    if row.status != APPROVED:
        return "rejected"
    if not settings.refresh_auto_promote:
        return "approved"
    if settings.canary_share > 0:
        return _start_canary(settings, db, registry, run, rec, version.id, active, on_promote)
    with rec.step("promote") as d:
        if not renew_lease(db, rec.holder, settings.refresh_lease_seconds):
            rec.lease_lost.set()
            rec.check_lease()
        # Fenced twice: the lease is still ours, and the incumbent is the one the candidate
        # was gated against (else PromotionConflict: the run fails, nothing changes).
        registry.promote(
            version.id,
            actor=f"refresh {run.id}",
            reason="passed the gate",
            expect_active=active.id if active else None,
        )
        d.update(version=version.id, replaced=active.id if active else None)
        if on_promote is not None:
            on_promote()
    return "promoted"


def _start_canary(
    settings: Settings,
    db: Database,
    registry: Registry,
    run: TrainingRun,
    rec: Any,
    candidate: str,
    active: AdapterVersion | None,
    on_promote: Callable[[], None] | None,
) -> str:
    """PREFLOOP_CANARY_SHARE > 0: prove the approved candidate on live traffic first; the
    canary's decision loop promotes or rejects it later (`service.loop.canary`). Fenced like a
    promotion: on the incumbent it was gated against."""
    from service.loop.canary import start

    with rec.step("canary") as d:
        try:
            exp = start(
                db,
                registry,
                settings,
                candidate=candidate,
                actor=f"refresh {run.id}",
                expect_incumbent=active.id if active else None,
            )
        except ConflictError as exc:  # another canary runs, or the incumbent changed
            d.update(started=False, reason=exc.message)
            return "approved"
        d.update(started=True, experiment=exp.id, share=exp.share, incumbent=exp.incumbent)
    if on_promote is not None:
        on_promote()  # the router loads the candidate and splits now
    return "canary"


def _approved(db: Database, segment: str, tenant: str) -> list[PreferencePair]:
    """The segment's approved pairs and lone thumbs, oldest first. A segment learns only from
    the tenant that owns it (tenant isolation)."""
    with Session(db) as s:
        return list(
            s.exec(
                select(PreferencePair)
                .where(
                    PreferencePair.status == "approved",
                    PreferencePair.segment == segment,
                    PreferencePair.tenant == tenant,
                )
                .order_by(col(PreferencePair.created_at), col(PreferencePair.key))
            ).all()
        )


def _describe(counts: dict[str, int]) -> str:
    return (
        f"{counts['pairs']} pairs, {counts['matched']} matched from thumbs, "
        f"{counts['thumbs_up']} thumbs up and {counts['thumbs_down']} down alone"
    )


def serving_paused(settings: Settings) -> AbstractContextManager:
    """vLLM's sleep mode around a refresh's GPU work, for processes without a gateway engine
    (`prefloop worker`, `prefloop refresh`); a no-op unless configured."""
    if settings.engine == "vllm" and settings.vllm_sleep_during_refresh:
        from service.engines.vllm import fleet_asleep

        return fleet_asleep(settings.vllm_urls)
    return contextlib.nullcontext()


def _mark_used(pair_ids: list[str], run_id: str, db: Database) -> None:
    """Pairs a refresh trained or judged on are `used` (whatever the verdict: a rejected
    update's pairs go back to operators for review, not into the next refresh unseen)."""
    with Session(db) as s:
        for row in s.exec(select(PreferencePair).where(col(PreferencePair.id).in_(pair_ids))):
            row.status = "used"
            row.provenance = {**row.provenance, "run_id": run_id}
            row.updated_at = utcnow()
            s.add(row)
        s.commit()
