"""Stored preference pairs on their way to the trainer: each row back as the compiler's record
(`to_trainer`, which the refresh writes into its training files) and exported as TRL-format
JSONL (`export_pairs`). They are compiled and stored by `service.feedback.compile_and_store`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from adapters.registry import as_utc
from service.storage.tables import PreferencePair
from trainer import records


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
