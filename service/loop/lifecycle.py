"""The adapter lifecycle's steps that need the service's data: gate a candidate (evaluate it
against the active version, decide, record) and watch live feedback (roll back on a drop).

The registry (`adapters.registry`) owns the states; the gate (`adapters.gate`) and the watch's
statistics (`adapters.watch`) are pure; this module feeds them and acts on their verdicts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from adapters.gate import Verdict, decide
from adapters.registry import (
    APPROVED,
    CANDIDATE,
    REJECTED,
    AdapterVersion,
    PromotionConflict,
    Registry,
)
from adapters.watch import Tally, WatchVerdict, compare
from service.core.config import Settings
from service.storage.models import Completion, Feedback

log = logging.getLogger(__name__)


def base_model_path(settings: Settings) -> Path:
    from service.engines.modelprep import prepare_default_model

    if settings.model:
        return Path(settings.model)
    return prepare_default_model(settings.models_dir, progress=False)


def segment_golden_file(settings: Settings, segment: str) -> Path:
    """A segment's own golden items, checked beside the shipped and the operator's."""
    return settings.home_dir / "golden" / f"{segment}.jsonl"


def golden_for(settings: Settings, segment: str) -> list[Any]:
    """The golden set a segment's candidates are checked on: the shipped items (unless
    `golden_include_shipped` is off), the operator's file, then the segment's own file
    (PREFLOOP_HOME/golden/<segment>.jsonl); a later item replaces an earlier one with its id."""
    from trainer.golden import SHIPPED_GOLDEN, load_golden

    files = [SHIPPED_GOLDEN] if settings.golden_include_shipped else []
    files += [settings.golden_file, segment_golden_file(settings, segment)]
    items = {item.id: item for path in files for item in load_golden(path)}
    return list(items.values())


def canary_for(settings: Settings, segment: str) -> Path | None:
    """The segment's canary prompts (PREFLOOP_HOME/canary/<segment>.jsonl, else
    PREFLOOP_HOME/canary.jsonl), or None for the shipped set."""
    for path in (
        settings.home_dir / "canary" / f"{segment}.jsonl",
        settings.home_dir / "canary.jsonl",
    ):
        if path.is_file():
            return path
    return None


def gate_version(
    settings: Settings,
    registry: Registry,
    version_id: str,
    *,
    heldout: list[dict[str, Any]] | None = None,
    actor: str = "gate",
    progress: bool = True,
) -> tuple[AdapterVersion, Verdict]:
    """Evaluate a candidate (in this process) against its segment's active version (or the
    base model) on the held-out pairs, the golden set and the canary prompts; then `judge` it."""
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


def judge(
    settings: Settings,
    registry: Registry,
    version_id: str,
    report: dict[str, Any],
    incumbent: AdapterVersion | None,
    *,
    actor: str = "gate",
) -> tuple[AdapterVersion, Verdict]:
    """Decide on an evaluation report, record it with the version, and approve or reject it."""
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


# --- live watch -------------------------------------------------------------------------------


def thumbs_tally(session: Session, version: str | None, since: datetime | None = None) -> Tally:
    """Thumbs on answers produced by ``version`` (None: the base model), optionally only on
    answers produced since a time (the version's promotion). Head-to-head turns are left out:
    their two answers come from two versions, and their signal is the pick."""
    q = (
        select(Feedback.value, func.count())
        .join(Completion, col(Feedback.completion_id) == Completion.id)
        .where(Feedback.kind == "thumbs", col(Completion.experiment_id).is_(None))
        .group_by(Feedback.value)
    )
    if version is None:
        q = q.where(col(Completion.adapter_version).is_(None))
    else:
        q = q.where(Completion.adapter_version == version)
    if since is not None:
        q = q.where(Completion.created_at >= since)
    counts = dict(session.exec(q).all())
    return Tally(up=counts.get(1, 0), down=counts.get(-1, 0))


@dataclass(frozen=True)
class WatchResult:
    version: str
    previous: str | None
    verdict: WatchVerdict
    rolled_back_to: str | None = None


def watch_once(
    db: Database, registry: Registry, settings: Settings, *, actor: str = "watch"
) -> list[WatchResult]:
    """Compare each active version's thumbs-up rate since its promotion with its predecessor's
    (the version it replaced, or the base model); roll back the significantly worse ones."""
    results = []
    for segment, active in registry.active().items():
        with Session(db) as session:
            new = thumbs_tally(session, active.id, since=active.promoted_at)
            old = thumbs_tally(session, active.previous)
        verdict = compare(new, old, settings.watch)
        result = WatchResult(active.id, active.previous, verdict)
        if verdict.rollback:
            try:
                back = registry.rollback(
                    segment,
                    actor=actor,
                    reason=f"live feedback dropped: {verdict.reason}",
                    expect_active=active.id,
                )
            except PromotionConflict as exc:  # someone else acted first; judge again next time
                log.info("watch: %s", exc)
                continue
            result = WatchResult(active.id, active.previous, verdict, back.id if back else None)
            log.warning(
                "rolled back %s to %s: %s", active.id, back.id if back else "base", verdict.reason
            )
        results.append(result)
    return results
