"""Stored feedback → stored preference pairs, and pairs → training files.

`compile_and_store` is the compile step the operator API, the CLI and (later) the scheduler call:
it loads the answers that have signals (feedback, or a kept regeneration) together with their
siblings, turns the rows into the compiler's records (`trainer.records`), runs the compiler
(`trainer.compiler`) with every stored key as `known_keys`, and stores what comes back — accepted
items as approved/pending, gate-excluded ones as excluded, so their keys stay known. Re-running
it stores nothing twice.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from adapters.registry import as_utc
from service.api.schemas import CompileSummary
from service.core.config import Settings
from service.core.db import session_scope
from service.core.errors import ConflictError
from service.privacy import tombstoned
from service.storage.crud import path_to
from service.storage.models import (
    Completion,
    Conversation,
    Feedback,
    Message,
    OperatorAction,
    PreferencePair,
    utcnow,
)
from trainer import compiler, quality, records


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


# Tool use as text, the way Hermes-style chat templates write it (and vLLM's `hermes` tool
# parser reads it back): the trainer renders plain (role, content) turns with the base model's
# own template, so a pair keeps the tools, calls and results it was answered with, and an
# adapter trained on it learns to write calls the vLLM engine parses.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def message_text(m: Message) -> str:
    """A stored message's content with its tool calls written out as text."""
    parts = [m.content] if m.content else []
    for call in m.tool_calls or ():
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:  # the model's arguments need not parse: keep them as written
            args = fn.get("arguments")
        parts.append(
            "<tool_call>\n"
            + json.dumps({"name": fn.get("name"), "arguments": args})
            + "\n</tool_call>"
        )
    return "\n".join(parts)


def prompt_messages(path: list[Message], tools: dict[str, Any] | None) -> list[dict[str, str]]:
    """A stored prompt as (role, content) turns: the offered tools in the system turn, a tool
    result as a user turn (so the prompt still ends with a user turn), calls as text."""
    out = []
    for m in path:
        if m.role == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"}
            )
        else:
            out.append({"role": m.role, "content": message_text(m)})
    offered = (tools or {}).get("tools")
    if offered:
        preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in offered))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _chunks(ids: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def _served_by(message: Message, completion: Completion) -> str | None:
    """The version that wrote an answer: a head-to-head turn's choices come from two (each
    message says which); any other turn's from its completion's."""
    return message.adapter_version if completion.experiment_id else completion.adapter_version


def load_signals(session: Session) -> tuple[list[records.Answer], list[records.Feedback]]:
    """Every feedback row, and every answer that shares a parent with a rated, picked, edited or
    kept answer (its siblings are what the signal is relative to). Deleted users' signals are
    left out (`service.privacy`): their later feedback and kept answers never train a model."""
    feedback_rows = session.exec(select(Feedback)).all()
    kept_parents = session.exec(
        select(Message.parent_id).where(col(Message.kept_at).is_not(None))
    ).all()
    signalled = sorted(
        {f.message_id for f in feedback_rows}
        | {f.other_message_id for f in feedback_rows if f.other_message_id}
    )
    parents = {p for p in kept_parents if p}
    for ids in _chunks(signalled):
        parents |= set(
            session.exec(select(Message.parent_id).where(col(Message.id).in_(ids))).all()
        )
    parents.discard(None)

    rows: list[tuple[Message, Completion]] = []
    for ids in _chunks(sorted(parents)):
        rows += session.exec(
            select(Message, Completion)
            .join(Completion, col(Message.completion_id) == Completion.id)
            .where(col(Message.parent_id).in_(ids), Message.role == "assistant")
            .where(Completion.status == "succeeded")
        ).all()

    conversation_ids = sorted({c.conversation_id for _, c in rows})
    tenants: dict[str, str] = {}
    tree: dict[str, dict[str, Message]] = {}
    for ids in _chunks(conversation_ids):
        for conv in session.exec(select(Conversation).where(col(Conversation.id).in_(ids))):
            tenants[conv.id] = conv.tenant
        for m in session.exec(select(Message).where(col(Message.conversation_id).in_(ids))):
            tree.setdefault(m.conversation_id, {})[m.id] = m

    answers = []
    for message, completion in rows:
        by_id = tree[completion.conversation_id]
        prompt = prompt_messages(path_to(by_id, completion.parent_message_id), completion.tools)
        answers.append(
            records.Answer(
                message_id=message.id,
                completion_id=completion.id,
                parent_id=completion.parent_message_id,
                prompt=prompt,
                text=message_text(message),
                tenant=tenants[completion.conversation_id],
                segment=completion.segment,
                user_id=completion.user_id or "anonymous",
                created_at=as_utc(message.created_at),
                choice_index=message.choice_index or 0,
                adapter_version=_served_by(message, completion) or "",
                sampling=completion.params,
                kept=message.kept_at is not None,
                regenerated_from=completion.regenerated_from,
                key_id=completion.key_id or "",
            )
        )
    feedback = [
        records.Feedback(
            id=f.id,
            message_id=f.message_id,
            user_id=f.user_id,
            kind=f.kind,  # type: ignore[arg-type]
            created_at=as_utc(f.updated_at),  # the time of the current vote
            value=f.value if f.kind == "thumbs" else 0,
            other_message_id=f.other_message_id,
            text=f.edited_text,
            comment=f.comment,
            author_role=f.author_role,  # type: ignore[arg-type]
            key_id=f.key_id or "",
        )
        for f in feedback_rows
    ]
    gone = tombstoned(session)
    if gone:
        tenant_of = {a.message_id: a.tenant for a in answers}
        feedback = [f for f in feedback if (tenant_of.get(f.message_id, ""), f.user_id) not in gone]
        # A deleted user's kept answer is no signal; the answer stays as another voter's sibling.
        answers = [replace(a, kept=False) if (a.tenant, a.user_id) in gone else a for a in answers]
    return answers, feedback


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
                    detail=summary.model_dump(exclude={"object"}),
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
