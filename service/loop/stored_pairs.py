"""Stored preference pairs: compiled from stored feedback, read back, exported as training files.

`compile_and_store` is the compile step the operator API, the CLI and the scheduler call: it
reads every stored signal as `trainer.records` records (`service.feedback.load_signals`), runs the
compiler with every stored key as `known_keys`, and stores what comes back — accepted items as
approved/pending, gate-excluded ones as excluded, so their keys stay known. Re-running it stores
nothing twice.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from adapters.registry import as_utc
from service.core.config import Settings
from service.core.errors import ConflictError
from service.feedback import load_signals
from service.storage.db import session_scope
from service.storage.models import OperatorAction, PreferencePair, utcnow
from trainer import compiler, quality, records


@dataclass(frozen=True)
class CompileSummary:
    """What one compile stored, and what it looked at."""

    stored: dict[str, int]  # by status: approved / pending / excluded
    pairs: int  # new DPO pairs accepted
    unpaired: int  # new KTO rows accepted
    excluded: int
    dropped: dict[str, int]  # DropReason -> count
    redactions: dict[str, int]
    answers: int  # answers considered
    feedback: int  # feedback rows considered


def gate_config(settings: Settings) -> quality.GateConfig:
    return quality.GateConfig(
        max_user_share=settings.pairs_max_user_share,
        min_batch_for_cap=settings.pairs_min_batch_for_cap,
        require_approval=settings.pairs_require_approval,
        near_dup_threshold=settings.pairs_near_dup_threshold or None,
        min_answer_chars=settings.pairs_min_answer_chars,
        max_answer_chars=settings.pairs_max_answer_chars,
        edit_weight=settings.pairs_edit_weight,
        max_key_share=settings.pairs_max_key_share,
        rater_trust=settings.pairs_rater_trust,
        min_rater_trust=settings.pairs_min_rater_trust,
        review_links=settings.pairs_review_links,
    )


def _row(item: records.PreferencePair | records.UnpairedExample, now: datetime) -> PreferencePair:
    common = dict(
        key=item.key,
        tenant=item.tenant,
        segment=item.segment,
        prompt=[m.as_dict() for m in item.prompt],
        source=item.source,
        weight=item.weight,
        status=item.status,
        excluded_reason=item.excluded_reason or None,
        created_at=now,
        updated_at=now,
    )
    signal = {
        "user_id": item.user_id,
        "key_id": item.key_id,
        "author_role": item.author_role,
        "signal_at": item.created_at.isoformat(),
        "feedback_ids": list(item.feedback_ids),
    }
    if isinstance(item, records.UnpairedExample):
        return PreferencePair(
            kind="unpaired",
            chosen=item.completion,
            label=item.label,
            provenance=signal
            | {
                "message_id": item.message_id,
                "completion_id": item.completion_id,
                "adapter_version": item.adapter_version,
                "sampling": dict(item.sampling),
                "parent_id": item.parent_id,
            },
            **common,
        )
    return PreferencePair(
        kind="pair",
        chosen=item.chosen,
        rejected=item.rejected,
        provenance=signal
        | {
            "chosen_message_id": item.chosen_message_id,
            "rejected_message_id": item.rejected_message_id,
            "chosen_completion_id": item.chosen_completion_id,
            "rejected_completion_id": item.rejected_completion_id,
            "chosen_adapter_version": item.chosen_adapter_version,
            "rejected_adapter_version": item.rejected_adapter_version,
            "chosen_sampling": dict(item.chosen_sampling),
            "rejected_sampling": dict(item.rejected_sampling),
        },
        **common,
    )


def compile_and_store(
    db: Database, settings: Settings, *, actor: str = "system", tenant: str | None = None
) -> CompileSummary:
    """Compile new pairs from every stored signal and store them; returns the counts.
    ``tenant``: only that tenant's signals (an operator's compile: its counts say nothing
    about other tenants).

    Reads and the compiler run outside the write transaction; the write is one transaction, and
    the unique `key` keeps a concurrent compile from storing an item twice (it gets a 409).
    """
    with Session(db) as session:
        answers, feedback = load_signals(session)
        known = set(session.exec(select(PreferencePair.key)).all())
    if tenant is not None:
        answers = [a for a in answers if a.tenant == tenant]
        mine = {a.message_id for a in answers}
        feedback = [f for f in feedback if f.message_id in mine]
    result = compiler.compile_pairs(answers, feedback, gate_config(settings), known_keys=known)

    now = utcnow()
    items = [*result.pairs, *result.unpaired, *result.excluded]
    rows = [_row(item, now) for item in items]
    stored = Counter(r.status for r in rows)
    summary = CompileSummary(
        stored=dict(stored),
        pairs=len(result.pairs),
        unpaired=len(result.unpaired),
        excluded=len(result.excluded),
        dropped=dict(result.dropped),
        redactions=dict(result.redactions),
        answers=len(answers),
        feedback=len(feedback),
    )
    try:
        with session_scope(db) as session:
            session.add_all(rows)
            session.add(
                OperatorAction(
                    actor=actor,
                    action="compile",
                    target_ids=[r.id for r in rows],
                    detail=asdict(summary),
                )
            )
    except IntegrityError as exc:
        raise ConflictError(
            "another compile stored some of these pairs at the same time; run it again",
            code="compile_conflict",
        ) from exc
    return summary


def to_trainer(row: PreferencePair) -> records.PreferencePair | records.UnpairedExample:
    """A stored row back as the compiler's record (for `trainer.records.dpo_row` / `kto_row`)."""
    p = row.provenance
    common = dict(
        key=row.key,
        prompt=records.as_messages(row.prompt),
        weight=row.weight,
        status=row.status,
        tenant=row.tenant,
        segment=row.segment,
        user_id=p.get("user_id", ""),
        key_id=p.get("key_id", ""),
        author_role=p.get("author_role", "user"),
        created_at=datetime.fromisoformat(p["signal_at"])
        if "signal_at" in p
        else as_utc(row.created_at),
        feedback_ids=tuple(p.get("feedback_ids", ())),
        source=row.source,
    )
    if row.kind == "unpaired":
        return records.UnpairedExample(
            completion=row.chosen,
            label=bool(row.label),
            message_id=p.get("message_id", ""),
            completion_id=p.get("completion_id", ""),
            adapter_version=p.get("adapter_version", ""),
            sampling=p.get("sampling", {}),
            parent_id=p.get("parent_id", ""),
            **common,
        )
    return records.PreferencePair(
        chosen=row.chosen,
        rejected=row.rejected or "",
        chosen_message_id=p.get("chosen_message_id"),
        rejected_message_id=p.get("rejected_message_id") or "",
        chosen_completion_id=p.get("chosen_completion_id"),
        rejected_completion_id=p.get("rejected_completion_id") or "",
        chosen_adapter_version=p.get("chosen_adapter_version"),
        rejected_adapter_version=p.get("rejected_adapter_version") or "",
        chosen_sampling=p.get("chosen_sampling", {}),
        rejected_sampling=p.get("rejected_sampling", {}),
        **common,
    )


def export_pairs(
    db: Database,
    *,
    fmt: Literal["dpo", "kto"],
    out: str | os.PathLike[str],
    statuses: Sequence[str] = ("approved",),
) -> int:
    """Write the stored pairs (`dpo`) or KTO rows (`kto`) with these statuses as TRL
    conversational JSONL, oldest first; returns the row count."""
    kind = "pair" if fmt == "dpo" else "unpaired"
    with Session(db) as session:
        rows = session.exec(
            select(PreferencePair)
            .where(PreferencePair.kind == kind, col(PreferencePair.status).in_(list(statuses)))
            .order_by(col(PreferencePair.created_at), col(PreferencePair.key))
        ).all()
    to_row = records.dpo_row if fmt == "dpo" else records.kto_row
    return records.write_jsonl((to_row(to_trainer(r)) for r in rows), out)  # type: ignore[arg-type]
