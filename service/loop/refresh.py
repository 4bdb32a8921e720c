"""One refresh: the loop the service exists for, as one recorded run. `_refresh` is the recipe,
one line per step:

    compile   new feedback into pairs (`service.loop.stored_pairs`)
    select    this segment's approved pairs, a seeded share held out for the gate
              (`service.loop.datasets`)
    train     a LoRA DPO update in a subprocess, warm-started from the active adapter
    register  it as a candidate version (`adapters.registry`)
    evaluate  it against the active one in a subprocess (`trainer.evaluate`)
    gate      approve or reject it on that report (`adapters.gate`); its pairs become `used`
    promote   an approved one: at once, or first a live canary (`service.loop.live_watch`)

Training and evaluation run as subprocesses (`python -m trainer ...`), so a crash or an
out-of-memory kills that process, not the server, and GPU memory is released when it exits.
Every step, its timing, the training progress and the subprocesses' log tail are written to the
`TrainingRun` row as they happen (`service.loop.runs`). A database lease
(`service.loop.lease`) keeps one refresh running at a time across every replica and worker.
Any failure leaves the active adapter as it was and the run `failed` with its reason;
cancelling (the operator API sets a flag) stops the subprocess at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine as Database

from adapters.gate import Verdict, decide
from adapters.registry import (
    APPROVED,
    CANDIDATE,
    REJECTED,
    AdapterVersion,
    PromotionConflict,
    Registry,
)
from service.core.config import Settings
from service.core.errors import ConflictError
from service.feedback import compile_and_store
from service.loop import live_watch
from service.loop.datasets import (
    TrainingSets,
    approved_items,
    base_model_path,
    canary_for,
    describe,
    golden_for,
    mark_used,
    training_sets,
    write_sets,
)
from service.loop.launch import _train_flags, run_subprocess
from service.loop.lease import HOLDER, acquire_lease, keep_renewing, release_lease, renew_lease
from service.loop.runs import Recorder, RefreshCancelled, RefreshSkipped, get_run
from service.loop.stored_pairs import to_trainer
from service.loop.trainjob import run_training
from service.storage.tables import PreferencePair, TrainingRun, utcnow
from trainer.golden import save_golden

log = logging.getLogger(__name__)


# --- the refresh ------------------------------------------------------------------------------


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

    def lost() -> None:
        log.error("refresh %s lost its lease: stopping it", run_id)
        rec.lease_lost.set()  # the next step, or the running subprocess, stops

    stop = keep_renewing(db, holder, ttl, lost)
    rec.update(status="running", started_at=utcnow(), holder=holder)
    work = settings.home_dir / "runs" / run.id
    job = Job(settings, db, registry, run, rec, deque(maxlen=200), work, on_promote)
    gpu = contextlib.ExitStack()  # what _refresh holds on the GPU; let go of whatever happens
    try:
        outcome = _refresh(job, gpu, gpu_guard or (lambda: serving_paused(settings)))
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
        rec.update(finished_at=utcnow(), log="\n".join(job.log_lines))
    return get_run(db, run_id)  # type: ignore[return-value]


@dataclass
class Job:
    """What every step of one refresh works with."""

    settings: Settings
    db: Database
    registry: Registry
    run: TrainingRun
    rec: Recorder
    log_lines: deque[str]  # the subprocesses' output, its tail kept with the run
    work: Path  # PREFLOOP_HOME/runs/<run id>: the data files, the adapter, the report
    on_promote: Callable[[], None] | None  # tells the router to sync now

    @property
    def segment(self) -> str:
        return self.run.segment

    @property
    def actor(self) -> str:
        return f"refresh {self.run.id}"


def _refresh(
    job: Job, gpu: contextlib.ExitStack, pause_serving: Callable[[], AbstractContextManager]
) -> str:
    """The recipe. Returns the outcome: rejected, approved, canary or promoted."""
    job.work.mkdir(parents=True, exist_ok=True)
    compile_feedback(job)
    rows, sets = select_data(job)
    active = job.registry.active().get(job.segment)  # the incumbent: warm start and yardstick
    base = base_model_path(job.settings)
    job.rec.update(parent_version=active.id if active else None)
    # Training and evaluation may share vLLM's GPU: pause it (PREFLOOP_VLLM_SLEEP_DURING_REFRESH)
    # until the evaluation is over; run_refresh wakes it if anything fails before then.
    gpu.enter_context(pause_serving())
    adapter = train_candidate(job, base, active)
    version = register_candidate(job, adapter, base, active, sets)
    report = evaluate_candidate(job, base, version, active, sets)
    gpu.close()  # serving resumes before the gate and the promotion
    if not gate_candidate(job, version, report, active, rows):
        return "rejected"
    return promote_candidate(job, version, active)


# --- the steps --------------------------------------------------------------------------------


def compile_feedback(job: Job) -> None:
    with job.rec.step("compile") as d:
        summary = compile_and_store(job.db, job.settings, actor=job.actor)
        d.update(new_pairs=summary.pairs, new_unpaired=summary.unpaired, excluded=summary.excluded)


def select_data(job: Job) -> tuple[list[PreferencePair], TrainingSets]:
    """The segment's approved items, split and written for the subprocesses; too few: skipped."""
    settings = job.settings
    with job.rec.step("select") as d:
        rows = approved_items(job.db, job.segment, settings.tenant_of(job.segment))
        sets = training_sets([to_trainer(r) for r in rows], settings)
        counts = {"approved": len(rows), "train": len(sets.train), **sets.counts}
        counts["heldout"] = len(sets.heldout_pairs) + len(sets.heldout_unpaired)
        d.update(counts)
        job.rec.update(counts=counts)
        if len(sets.train) < settings.refresh_min_pairs:
            raise RefreshSkipped(
                f"{len(sets.train)} approved training items in segment {job.segment!r} "
                f"({describe(sets.counts)}); a refresh needs {settings.refresh_min_pairs} "
                "(PREFLOOP_REFRESH_MIN_PAIRS)"
            )
        write_sets(sets, job.work)
    return rows, sets


def train_candidate(job: Job, base: Path, active: AdapterVersion | None) -> Path:
    """`trainer train` where PREFLOOP_REFRESH_LAUNCHER says (a subprocess, torchrun, a Job);
    returns the adapter."""
    settings, work, out = job.settings, job.work, job.work / "adapter"
    with job.rec.step("train") as d:
        cmd = [
            "train",
            "--pairs", str(work / "train.jsonl"), "--base", str(base), "--out", str(out),
            "--no-progress",
            *_train_flags(
                {**settings.refresh_train, **settings.refresh_train_segments.get(job.segment, {})}
            ),
        ]  # fmt: skip
        if active is not None:  # warm start: the active adapter is the policy and reference
            cmd += ["--init-adapter", active.path]
        if settings.rehearsal_file is not None:
            cmd += ["--rehearsal-prompts", str(settings.rehearsal_file)]
        if out.exists():  # a retried run: resume its checkpoint, never overwrite a version
            cmd += ["--resume"]
        metrics = [work / ".adapter.partial" / "metrics.jsonl", out / "metrics.jsonl"]
        # A subprocess here, or a Job on the cluster (PREFLOOP_REFRESH_LAUNCHER).
        run_training(
            settings, job.rec, cmd, name=f"prefloop-{job.run.id}", log_lines=job.log_lines,
            progress_files=metrics,
        )  # fmt: skip
        manifest = json.loads((out / "manifest.json").read_text())
        d.update(
            steps=manifest["metrics"]["steps"],
            seconds=manifest["metrics"]["seconds"]["total"],
            processes=manifest.get("world_size", 1),
        )
    return out


def register_candidate(
    job: Job, adapter: Path, base: Path, active: AdapterVersion | None, sets: TrainingSets
) -> AdapterVersion:
    with job.rec.step("register") as d:
        version = job.registry.register(
            adapter,
            segment=job.segment,
            base_model=str(base),
            parent=active.id if active else None,
            actor=job.actor,
            reason=f"trained by {job.run.id} on {describe(sets.counts)}",
        )
        d.update(version=version.id)
        job.rec.update(candidate_version=version.id)
    return version


def evaluate_candidate(
    job: Job, base: Path, version: AdapterVersion, active: AdapterVersion | None, sets: TrainingSets
) -> dict[str, Any]:
    """`python -m trainer evaluate`: the candidate, the incumbent and the base model on the
    held-out items, the golden set and the canary prompts; returns its report."""
    settings, work = job.settings, job.work
    with job.rec.step("evaluate") as d:
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
        golden = golden_for(settings, job.segment)
        if golden:
            save_golden(work / "golden.jsonl", golden)
            cmd += ["--golden", str(work / "golden.jsonl")]
        if (canary := canary_for(settings, job.segment)) is not None:
            cmd += ["--canary", str(canary)]
        if sets.heldout_pairs:
            cmd += ["--pairs", str(work / "heldout.jsonl")]
        if sets.heldout_unpaired:
            cmd += ["--unpaired", str(work / "heldout_unpaired.jsonl")]
        run_subprocess(
            cmd,
            job.rec,
            log_lines=job.log_lines,
            timeout=settings.refresh_train_timeout_minutes * 60,
        )
        report = json.loads((work / "report.json").read_text())
        d.update(seconds=report.get("seconds"), cached=report.get("cached", []))
    return report


def gate_candidate(
    job: Job,
    version: AdapterVersion,
    report: dict[str, Any],
    active: AdapterVersion | None,
    rows: list[PreferencePair],
) -> bool:
    """The offline gate (`judge`): is the candidate approved? Its pairs are `used` either way."""
    with job.rec.step("gate") as d:
        row, verdict = judge(
            job.settings, job.registry, version.id, report, active, actor=job.actor
        )
        d.update(approved=verdict.approved, reasons=verdict.reasons)
        job.rec.update(verdict=verdict.to_json())
        mark_used([r.id for r in rows], job.run.id, job.db)
    return row.status == APPROVED


def promote_candidate(job: Job, version: AdapterVersion, active: AdapterVersion | None) -> str:
    """An approved candidate serves everyone now, or first a share of users in a live canary
    (PREFLOOP_CANARY_SHARE > 0), or waits for an operator (PREFLOOP_REFRESH_AUTO_PROMOTE off)."""
    settings, rec = job.settings, job.rec
    if not settings.refresh_auto_promote:
        return "approved"
    if settings.canary_share > 0:
        return _start_canary(job, version.id, active)
    with rec.step("promote") as d:
        if not renew_lease(job.db, rec.holder, settings.refresh_lease_seconds):
            rec.lease_lost.set()
            rec.check_lease()
        # Fenced twice: the lease is still ours, and the incumbent is the one the candidate
        # was gated against (else PromotionConflict: the run fails, nothing changes).
        job.registry.promote(
            version.id,
            actor=job.actor,
            reason="passed the gate",
            expect_active=active.id if active else None,
        )
        d.update(version=version.id, replaced=active.id if active else None)
        if job.on_promote is not None:
            job.on_promote()
    return "promoted"


def _start_canary(job: Job, candidate: str, active: AdapterVersion | None) -> str:
    """Prove the approved candidate on live traffic first; the live watch promotes or rejects
    it later (`service.loop.live_watch`). Fenced like a promotion: on the incumbent it was gated
    against."""
    with job.rec.step("canary") as d:
        try:
            exp = live_watch.start(
                job.db,
                job.registry,
                job.settings,
                candidate=candidate,
                actor=job.actor,
                expect_incumbent=active.id if active else None,
            )
        except ConflictError as exc:  # another canary runs, or the incumbent changed
            d.update(started=False, reason=exc.message)
            return "approved"
        d.update(started=True, experiment=exp.id, share=exp.share, incumbent=exp.incumbent)
    if job.on_promote is not None:
        job.on_promote()  # the router loads the candidate and splits now
    return "canary"


# --- the gate's verdict -----------------------------------------------------------------------


def judge(
    settings: Settings,
    registry: Registry,
    version_id: str,
    report: dict[str, Any],
    incumbent: AdapterVersion | None,
    *,
    actor: str = "gate",
) -> tuple[AdapterVersion, Verdict]:
    """Decide on an evaluation report (`adapters.gate.decide`, with the segment's thresholds),
    record it with the version, and approve or reject it."""
    report["incumbent"]["version"] = incumbent.id if incumbent is not None else None
    thresholds = settings.gate_for(registry.get(version_id).segment)
    verdict = decide(
        report["candidate"], report["incumbent"], thresholds, base=report.get("base_model")
    )
    registry.record_eval(version_id, report, verdict.to_json())
    against = incumbent.id if incumbent is not None else "the base model"
    if verdict.approved:
        reason = f"passed the gate against {against}"
    else:
        reason = f"failed the gate against {against}: " + "; ".join(verdict.reasons)
    row = registry.transition(
        version_id, APPROVED if verdict.approved else REJECTED, actor=actor, reason=reason
    )
    return row, verdict


def gate_version(
    settings: Settings,
    registry: Registry,
    version_id: str,
    *,
    heldout: list[dict[str, Any]] | None = None,
    actor: str = "gate",
    progress: bool = True,
) -> tuple[AdapterVersion, Verdict]:
    """Gate a registered candidate by hand (`prefloop adapters gate`): evaluate it in this
    process against its segment's active version (or the base model) on the held-out pairs, the
    golden set and the canary prompts; then `judge` it as a refresh would."""
    from trainer.evaluate import evaluate, load_canary

    row = registry.get(version_id)
    if row.status != CANDIDATE:
        raise PromotionConflict(f"{version_id} is {row.status}; only candidates are gated")
    incumbent = registry.active().get(row.segment)
    report = evaluate(
        base_model_path(settings),
        Path(row.path),
        Path(incumbent.path) if incumbent is not None else None,
        pairs=heldout,
        golden=golden_for(settings, row.segment),
        canary=load_canary(canary_for(settings, row.segment)),
        max_new_tokens=settings.eval_max_new_tokens,
        progress=progress,
    )
    return judge(settings, registry, version_id, report, incumbent, actor=actor)


def serving_paused(settings: Settings) -> AbstractContextManager:
    """vLLM's sleep mode around a refresh's GPU work, for processes without a gateway engine
    (`prefloop worker`, `prefloop refresh`); a no-op unless configured."""
    if settings.engine == "vllm" and settings.vllm_sleep_during_refresh:
        from service.engines.vllm import fleet_asleep

        return fleet_asleep(settings.vllm_urls)
    return contextlib.nullcontext()
