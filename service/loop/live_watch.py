"""After the offline gate, live traffic decides: the live watch.

Two decisions run here, every `PREFLOOP_WATCH_INTERVAL_SECONDS` in every replica (`run`):

- rollback: a promoted version whose thumbs-up rate since its promotion is significantly below
  its predecessor's (`adapters.watch.compare`) is rolled back (`watch_once`);
- canary: a running experiment is looked at and promoted, rolled back, stopped or continued
  (`decide_all`, below).

Live canaries prove an approved adapter version on real traffic before it serves everyone.

An experiment (`service.storage.tables.Experiment`) serves a sticky `share` of a segment's end users
the candidate version and the rest the incumbent (the segment's active version, or the base
model); `service.engines.routing` splits the requests, so each stored completion's `adapter_version`
says which arm answered. A share of the widget's "which is better?" turns
(`PREFLOOP_CANARY_DUEL_SHARE`) is a head-to-head instead: one answer from each arm, each
message's `adapter_version` saying which, and the user's pick is a direct vote. Every look
(`decide_once`, run by the live watch's loop) counts each arm's answers, thumbs, regenerations
and head-to-head picks since the start and asks `adapters.canary.decide`:

    continue   keep going (the snapshot records what the look saw)
    promote    the registry promotes the candidate, fenced on the incumbent: if another version
               became active meanwhile nothing is promoted and the experiment ends `stopped`
    rollback   the registry rejects the candidate (the incumbent never stopped serving)
    stop       no decision (too long, too many outcomes): the incumbent stays

Operators can stop, promote or roll back by hand; every end is audited (an `OperatorAction`
row, and the registry's `AdapterEvent`s) with its actor.

Fleet safety: every replica runs the loop, so ending an experiment first claims its row with a
conditional UPDATE (`status = 'running'` -> `stopped`): one process wins and acts, the others
find it ended. The claim says `stopped` until the registry has acted, so a crash in between
leaves the safe truth (the incumbent serves, nothing was promoted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import and_, case, func, or_, update
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from adapters import canary as stats
from adapters.registry import (
    APPROVED,
    REJECTED,
    AdapterVersion,
    PromotionConflict,
    Registry,
    RegistryError,
    as_utc,
)
from adapters.watch import Tally, WatchVerdict, compare
from service.core.config import Settings
from service.core.errors import ConflictError, InvalidRequestError, NotFoundError
from service.storage.db import session_scope
from service.storage.experiments import (
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    STOPPED,
    list_experiments,
    running,
)
from service.storage.tables import Completion, Experiment, Feedback, Message, OperatorAction, utcnow

log = logging.getLogger(__name__)

STATUSES = (RUNNING, PROMOTED, ROLLED_BACK, STOPPED)
ENDED_BY_ACTION = {"promote": PROMOTED, "rollback": ROLLED_BACK, "stop": STOPPED}


class Kickable(Protocol):
    def kick(self) -> None: ...


async def run(db: Database, registry: Registry, router: Kickable, settings: Settings) -> None:
    """The live watch's loop: roll back a promoted version whose thumbs-up rate dropped; then one
    look at every running canary (promote, roll back, stop or continue). Every replica runs it:
    the registry's fences and the experiments' conditional updates let one of them act. The
    router syncs at once after a change."""
    while True:
        await asyncio.sleep(settings.watch_interval_seconds)
        try:
            results = await asyncio.to_thread(watch_once, db, registry, settings)
            looks = await asyncio.to_thread(decide_all, db, registry)
        except Exception:  # noqa: BLE001 - try again next interval
            log.exception("the live watch failed")
            continue
        if any(r.verdict.rollback for r in results) or any(e.status != RUNNING for e in looks):
            router.kick()


# --- rollback of a promoted version ------------------------------------------------------------
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


# --- reading -----------------------------------------------------------------------------------
def get(db: Database, experiment_id: str) -> Experiment:
    with Session(db, expire_on_commit=False) as s:
        row = s.get(Experiment, experiment_id)
    if row is None:
        raise NotFoundError(f"no experiment {experiment_id!r}", code="experiment_not_found")
    return row


def policy_of(experiment: Experiment) -> stats.CanaryPolicy:
    known = {f.name for f in dataclasses.fields(stats.CanaryPolicy)}
    return stats.CanaryPolicy(**{k: v for k, v in experiment.policy.items() if k in known})


def resolve_policy(settings: Settings, overrides: dict[str, Any] | None) -> stats.CanaryPolicy:
    """The settings' policy (PREFLOOP_CANARY__*) with a request's overrides."""
    known = {f.name for f in dataclasses.fields(stats.CanaryPolicy)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise InvalidRequestError(
            f"unknown policy field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            param="policy",
        )
    try:
        return dataclasses.replace(settings.canary, **(overrides or {}))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"invalid policy: {exc}", param="policy") from exc


# --- starting ----------------------------------------------------------------------------------
def start(
    db: Database,
    registry: Registry,
    settings: Settings,
    *,
    candidate: str,
    actor: str,
    share: float | None = None,
    policy: dict[str, Any] | None = None,
    expect_incumbent: str | None | object = ...,
) -> Experiment:
    """Start serving `candidate` (approved by the gate) to `share` of its segment's users beside
    the active version. `expect_incumbent` (a version id, None for the base model): the
    version the caller compared it with; another active one is a conflict."""
    share = _share(settings, share)
    resolved = resolve_policy(settings, policy)
    row = registry.get(candidate)
    incumbent = _incumbent(registry, row, expect_incumbent)
    experiment = Experiment(
        tenant=settings.tenant_of(row.segment),
        segment=row.segment,
        candidate=candidate,
        incumbent=incumbent,
        share=share,
        policy=dataclasses.asdict(resolved),
        created_by=actor,
        reason="started",
    )
    try:
        with session_scope(db) as s:
            s.add(experiment)
            s.flush()  # the one-running-per-segment index refuses a second one here
            s.add(_audit(actor, "start", experiment, {"share": share, "incumbent": incumbent}))
    except IntegrityError as exc:
        other = list_experiments(db, segment=row.segment, status=RUNNING, limit=1)
        raise ConflictError(
            f"segment {row.segment!r} already runs experiment "
            f"{other[0].id if other else '(another)'}; stop it first",
            code="experiment_running",
        ) from exc
    log.info("canary %s: %s on %.0f%% of %s", experiment.id, candidate, share * 100, row.segment)
    return experiment


def _share(settings: Settings, share: float | None) -> float:
    """The share asked for, else the configured one; a clear 400 when neither is usable."""
    if share is None and not settings.canary_share:
        raise InvalidRequestError(
            "name the share of users to serve the candidate (PREFLOOP_CANARY_SHARE is 0)",
            param="share",
        )
    share = settings.canary_share if share is None else share
    if not 0.0 < share < 1.0:
        raise InvalidRequestError(f"share must lie between 0 and 1, not {share}", param="share")
    return share


def _incumbent(
    registry: Registry, row: AdapterVersion, expect_incumbent: str | None | object
) -> str | None:
    """The version `row` would be compared with (None: the base model), checked: the candidate
    passed the gate, and the active version is the one the caller expects."""
    if row.status != APPROVED:
        raise ConflictError(
            f"{row.id} is {row.status}; only a version the gate approved can be canaried",
            code="candidate_not_approved",
        )
    active = registry.active().get(row.segment)
    incumbent = active.id if active is not None else None
    if expect_incumbent is not ... and expect_incumbent != incumbent:
        raise ConflictError(
            f"{row.segment!r} is served by {incumbent or 'the base model'}, not "
            f"{expect_incumbent or 'the base model'}",
            code="incumbent_changed",
        )
    return incumbent


def _audit(actor: str, action: str, exp: Experiment, detail: dict[str, Any]) -> OperatorAction:
    return OperatorAction(
        actor=actor,
        action=f"canary.{action}",
        target_ids=[exp.id, exp.candidate],
        detail={"segment": exp.segment, **detail},
    )


# --- the arms' signals -------------------------------------------------------------------------
# The end user a split assigned (the completion's user, else its key; else its own subject).
_SUBJECT = func.coalesce(Completion.user_id, Completion.key_id, Completion.id)


def _scope(exp: Experiment) -> list[Any]:
    """The completions an experiment counts: its segment's, answered by one of its arms between
    its start and end. Requests that pinned a version by name chose their arm themselves;
    head-to-head turns (any experiment's) count only through their pick."""
    served = col(Completion.adapter_version)
    incumbent = served.is_(None) if exp.incumbent is None else served == exp.incumbent
    where = [
        Completion.segment == exp.segment,
        Completion.created_at >= exp.started_at,
        Completion.status == "succeeded",
        col(Completion.experiment_id).is_(None),
        or_(served.is_(None), Completion.model != Completion.adapter_version),
        or_(incumbent, served == exp.candidate),
    ]
    if exp.ended_at is not None:
        where.append(Completion.created_at <= exp.ended_at)
    return where


class Arms(NamedTuple):
    candidate: stats.ArmStats
    incumbent: stats.ArmStats
    covariance: float  # of the two rates, through people counted in both (head-to-head picks)


def arm_stats(db: Database, exp: Experiment) -> Arms:
    """Each arm's answers, the end users' thumbs on them, how many of them were regenerated
    (counted only without a thumbs down: both say the same thing), and its head-to-head wins
    and losses (a pick between one answer from each arm: a success for the picked arm, a
    failure for the other; those turns count only through their pick).

    Summed per end user first (`adapters.canary.combine`): several answers from one person are
    not independent outcomes, and the per-user sums make the test's variance cluster-robust.
    The subject is the one the split used (the completion's user, else its key); an answer with
    neither is its own subject."""
    per_subject: dict[Any, list[stats.ArmStats]] = {}
    zero = stats.ArmStats(0, 0, 0, 0)

    def add(subject: Any, arm: int, **counts: int) -> None:
        row = per_subject.setdefault(subject, [zero, zero])
        row[arm] = dataclasses.replace(
            row[arm], **{k: getattr(row[arm], k) + v for k, v in counts.items()}
        )

    with Session(db) as s:
        answers, duels = s.exec(_answers_query(exp)).all(), s.exec(_duels_query(exp)).all()
    for version, subject, n, n_up, n_down, n_regen in answers:
        arm = 0 if version == exp.candidate else 1
        add(subject, arm, answers=n, up=int(n_up), down=int(n_down), regenerated=int(n_regen))
    for version, subject, n in duels:
        winner = 0 if version == exp.candidate else 1
        add(subject, winner, won=n)
        add(subject, 1 - winner, lost=n)
    rows = list(per_subject.values())
    return Arms(
        stats.combine(r[0] for r in rows),
        stats.combine(r[1] for r in rows),
        stats.covariance((r[0], r[1]) for r in rows),
    )


def _answers_query(exp: Experiment) -> Any:
    """Per (arm, subject): answers, thumbs up, thumbs down, regenerated without a thumbs down."""
    thumbs = (
        select(
            Feedback.completion_id.label("cid"),
            func.sum(case((Feedback.value > 0, 1), else_=0)).label("up"),
            func.sum(case((Feedback.value < 0, 1), else_=0)).label("down"),
        )
        .where(Feedback.kind == "thumbs", Feedback.author_role == "user")
        .group_by(Feedback.completion_id)
        .subquery()
    )
    later = aliased(Completion)
    regenerated = select(later.id).where(later.regenerated_from == Completion.id).exists()
    up, down = func.coalesce(thumbs.c.up, 0), func.coalesce(thumbs.c.down, 0)
    return (
        select(
            Completion.adapter_version,
            _SUBJECT,
            func.count(),
            func.sum(up),
            func.sum(down),
            func.sum(case((and_(regenerated, down == 0), 1), else_=0)),
        )
        .select_from(Completion)
        .outerjoin(thumbs, thumbs.c.cid == Completion.id)
        .where(*_scope(exp))
        .group_by(Completion.adapter_version, _SUBJECT)
    )


def _duels_query(exp: Experiment) -> Any:
    """Per (picked arm, subject): the end users' picks on the experiment's head-to-head turns
    (one per user and turn: a later pick replaces the earlier)."""
    picked = aliased(Message)
    return (
        select(picked.adapter_version, _SUBJECT, func.count())
        .select_from(Feedback)
        .join(Completion, col(Completion.id) == Feedback.completion_id)
        .join(picked, col(picked.id) == Feedback.message_id)
        .where(
            Feedback.kind == "pick",
            Feedback.author_role == "user",
            Completion.experiment_id == exp.id,
            Completion.status == "succeeded",
        )
        .group_by(picked.adapter_version, _SUBJECT)
    )


def _counts(arm: stats.ArmStats) -> dict[str, int]:
    return {k: getattr(arm, k) for k in ("answers", "up", "down", "regenerated", "won", "lost")}


def snapshot(
    cand: stats.ArmStats, inc: stats.ArmStats, decision: stats.Decision, hours: float
) -> dict[str, Any]:
    """What one look saw, kept with the experiment (JSON)."""
    return {
        "candidate": _counts(cand),
        "incumbent": _counts(inc),
        "action": decision.action,
        "reason": decision.reason,
        "candidate_rate": decision.candidate_rate,
        "incumbent_rate": decision.incumbent_rate,
        "difference": decision.difference,
        "interval": list(decision.interval),
        "outcomes": list(decision.outcomes),
        "elapsed_hours": round(hours, 4),
        "at": utcnow().isoformat(),
    }


def look(db: Database, exp: Experiment) -> tuple[stats.Decision, dict[str, Any]]:
    """The test's verdict on the experiment's counts now (nothing is acted on or stored)."""
    cand, inc, cov = arm_stats(db, exp)
    hours = elapsed_hours(exp)
    decision = stats.decide(cand, inc, policy_of(exp), hours, cov)
    return decision, snapshot(cand, inc, decision, hours)


# --- deciding ----------------------------------------------------------------------------------
def decide_once(
    db: Database, registry: Registry, experiment_id: str, *, actor: str = "canary"
) -> Experiment:
    """One look at a running experiment, acted on. Safe to run in every replica at once."""
    exp = get(db, experiment_id)
    if exp.status != RUNNING:
        return exp
    fence = _fence(registry, exp)
    if fence is not None:  # the comparison no longer means anything: end without a decision
        return _end(db, registry, exp, "stop", fence, exp.snapshot, actor)
    decision, snap = look(db, exp)
    if decision.action == "continue":
        with session_scope(db) as s:
            s.exec(
                update(Experiment)
                .where(col(Experiment.id) == exp.id, col(Experiment.status) == RUNNING)
                .values(snapshot=snap, reason=decision.reason, decided_at=utcnow())
            )
        return get(db, exp.id)
    return _end(db, registry, exp, decision.action, decision.reason, snap, actor)


def _fence(registry: Registry, exp: Experiment) -> str | None:
    """Why the experiment can no longer decide (its incumbent or candidate changed), or None."""
    active = registry.active().get(exp.segment)
    current = active.id if active is not None else None
    if current != exp.incumbent:
        return (
            f"the incumbent changed: {exp.segment!r} is now served by "
            f"{current or 'the base model'}, not {exp.incumbent or 'the base model'}, which "
            f"{exp.candidate} was compared with; not promoted"
        )
    status = registry.get(exp.candidate).status
    if status != APPROVED:
        return f"{exp.candidate} became {status} outside the experiment"
    return None


def decide_all(db: Database, registry: Registry, *, actor: str = "canary") -> list[Experiment]:
    """`decide_once` for every running experiment (the live watch's loop calls it)."""
    results = []
    for exp in running(db):
        try:
            results.append(decide_once(db, registry, exp.id, actor=actor))
        except Exception:  # noqa: BLE001 - one broken experiment must not stall the others
            log.exception("canary %s: the look failed", exp.id)
    return results


def _end(
    db: Database,
    registry: Registry,
    exp: Experiment,
    action: str,
    reason: str,
    snap: dict[str, Any] | None,
    actor: str,
) -> Experiment:
    """Claim the experiment (only one process can), act through the registry, record it."""
    now = utcnow()
    with session_scope(db) as s:
        claimed = s.exec(
            update(Experiment)
            .where(col(Experiment.id) == exp.id, col(Experiment.status) == RUNNING)
            .values(
                status=STOPPED,
                reason=f"deciding ({action}): {reason}",
                snapshot=snap,
                ended_at=now,
                ended_by=actor,
                decided_at=now,
            )
        ).rowcount
    if claimed != 1:
        raise ConflictError(f"experiment {exp.id} already ended", code="experiment_ended")
    status, outcome = ENDED_BY_ACTION[action], reason
    try:
        if action == "promote":
            registry.promote(
                exp.candidate,
                actor=actor,
                reason=f"canary {exp.id}: {reason}",
                expect_active=exp.incumbent,
            )
        elif action == "rollback":
            registry.transition(
                exp.candidate, REJECTED, actor=actor, reason=f"canary {exp.id}: {reason}"
            )
    except RegistryError as exc:  # fenced: the incumbent (or the candidate) changed meanwhile
        status, outcome = STOPPED, f"not {ENDED_BY_ACTION[action].replace('_', ' ')}: {exc}"
    with session_scope(db) as s:
        row = s.get(Experiment, exp.id)
        row.status, row.reason = status, outcome
        s.add(row)
        s.add(_audit(actor, action, row, {"status": status, "reason": outcome}))
    log.warning("canary %s ended %s by %s: %s", exp.id, status, actor, outcome)
    return get(db, exp.id)


# --- operators ---------------------------------------------------------------------------------
def act(
    db: Database,
    registry: Registry,
    experiment_id: str,
    action: str,
    *,
    actor: str,
    reason: str | None = None,
) -> Experiment:
    """An operator ends a running experiment: stop (the incumbent stays), promote the candidate
    now (fenced on the incumbent), or roll it back (reject it). 409 once it has ended."""
    if action not in ENDED_BY_ACTION:
        raise InvalidRequestError(f"unknown action {action!r}", param="action")
    exp = get(db, experiment_id)
    if exp.status != RUNNING:
        raise ConflictError(
            f"experiment {exp.id} already ended ({exp.status}): {exp.reason}",
            code="experiment_ended",
        )
    if action == "promote" and (fence := _fence(registry, exp)) is not None:
        raise ConflictError(fence, code="incumbent_changed")
    _, snap = look(db, exp)
    why = f"{action} by {actor}" + (f": {reason}" if reason else "")
    ended = _end(db, registry, exp, action, why, {**snap, "by_hand": True}, actor)
    if ended.status != ENDED_BY_ACTION[action]:
        raise ConflictError(ended.reason or "not done", code="concurrent_change")
    return ended


def elapsed_hours(exp: Experiment, now: datetime | None = None) -> float:
    end = as_utc(exp.ended_at) or now or utcnow()
    return (end - as_utc(exp.started_at)).total_seconds() / 3600
