"""Feedback: one signal in, one committed row out; and every stored signal read back as the
pair compiler's records.

The route awaits `submit_feedback`, which hands the write to the group-commit thread and returns
after the commit. Each signal is one write in a shared transaction: look up the idempotency
key, check the completion, upsert the user's slot (`service.storage.feedback`).

`load_signals` is the way back: the stored answers that have signals (feedback, or a kept
regeneration) together with their siblings, as `trainer.records` records.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Row
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from adapters.registry import as_utc
from service import observability
from service.core.errors import NotFoundError
from service.core.identity import Principal
from service.privacy import tombstoned
from service.storage import feedback as stored
from service.storage.db import GroupCommit
from service.storage.models import Completion, Feedback, Message
from service.storage.turns import path_to
from trainer import records


@dataclass(frozen=True)
class Author:
    """Who is sending feedback: a user, or an operator (writing ideal answers)."""

    role: str  # user|operator
    name: str | None  # the operator's name; users name themselves with the `user` field
    caller: Principal


@dataclass(frozen=True)
class Signal:
    """One feedback signal, as the client sent it."""

    kind: str  # thumbs | pick | edit
    completion_id: str
    choice_index: int  # thumbs, edit: the rated choice; pick: the chosen one
    value: int  # thumbs: ±1; pick: the chosen index; edit: 0
    user: str | None = None
    comment: str | None = None
    text: str | None = None  # edit: the ideal answer
    request: dict[str, Any] = field(default_factory=dict)  # the body: tells a retry apart


class _CompletionCache:
    """Succeeded completions never change, and feedback on one tends to come in bursts (a
    popular answer, an A/B test): keep the last few thousand and skip two reads per write."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.items: OrderedDict[tuple[str, str], stored.RatedCompletion] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, db: Database, session: object, completion_id: str) -> stored.RatedCompletion:
        key = (str(db.url), completion_id)
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        found = stored.rated_completion(session, completion_id=completion_id)  # type: ignore[arg-type]
        if found.status == "succeeded":
            with self.lock:
                self.items[key] = found
                if len(self.items) > self.size:
                    self.items.popitem(last=False)
        return found


_completions = _CompletionCache()


async def submit_feedback(
    writer: GroupCommit, signal: Signal, author: Author, idempotency_key: str | None
) -> tuple[Feedback | Row, bool]:
    """Store one signal; returns (the stored feedback, whether this was a replayed retry).

    Returns only after the group transaction holding the write has committed.
    """
    caller = author.caller
    digest = stored.request_hash(
        {"body": signal.request, "author": author.role, "by": author.name, "key": caller.key_id}
    )

    def write(session: Session) -> tuple[Feedback | Row, bool]:
        if idempotency_key is not None:
            earlier = stored.feedback_by_idempotency_key(
                session, key=idempotency_key, request_hash=digest
            )
            if earlier is not None:
                return earlier, True
        completion = _completions.get(writer.engine, session, signal.completion_id)
        if not caller.owns(completion.key_id, completion.tenant, completion.user_id):
            # Another key's completion is, to this caller, one that does not exist.
            raise NotFoundError(
                f"completion {signal.completion_id!r} not found", param="completion_id"
            )
        row = stored.record_feedback(
            session,
            kind=signal.kind,
            completion=completion,
            key_id=caller.key_id,
            choice_index=signal.choice_index,
            value=signal.value,
            # A widget visitor is who the server says, whatever `user` the body names.
            user_id=caller.visitor_user or signal.user or author.name,
            author_role=author.role,
            comment=signal.comment,
            edited_text=signal.text,
            idempotency_key=idempotency_key,
            request_hash=digest,
        )
        return row, False

    for attempt in range(2):
        try:
            row, replayed = await writer.write(write)
        except IntegrityError:
            # Another process's first write with the same Idempotency-Key won the race; the
            # retry sees its row and replays it (or answers 409).
            if attempt == 1:
                raise
            continue
        if not replayed:
            observability.FEEDBACK.labels(signal.kind).inc()
        return row, replayed
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Read back for the pair compiler

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


def load_signals(session: Session) -> tuple[list[records.Answer], list[records.Feedback]]:
    """Every feedback row, and every answer that shares a parent with a rated, picked, edited or
    kept answer (its siblings are what the signal is relative to). Deleted users' signals are
    left out (`service.privacy`): their later feedback and kept answers never train a model."""
    signals = stored.stored_signals(session)
    answers = [
        _answer(message, completion, signals.tenants, signals.trees)
        for message, completion in signals.answers
    ]
    feedback = [_vote(f) for f in signals.feedback]
    gone = tombstoned(session)
    if gone:
        tenant_of = {a.message_id: a.tenant for a in answers}
        feedback = [f for f in feedback if (tenant_of.get(f.message_id, ""), f.user_id) not in gone]
        # A deleted user's kept answer is no signal; the answer stays as another voter's sibling.
        answers = [replace(a, kept=False) if (a.tenant, a.user_id) in gone else a for a in answers]
    return answers, feedback


def _served_by(message: Message, completion: Completion) -> str | None:
    """The version that wrote an answer: a head-to-head turn's choices come from two (each
    message says which); any other turn's from its completion's."""
    return message.adapter_version if completion.experiment_id else completion.adapter_version


def _answer(
    message: Message,
    completion: Completion,
    tenants: dict[str, str],
    trees: dict[str, dict[str, Message]],
) -> records.Answer:
    path = path_to(trees[completion.conversation_id], completion.parent_message_id)
    return records.Answer(
        message_id=message.id,
        completion_id=completion.id,
        parent_id=completion.parent_message_id,
        prompt=prompt_messages(path, completion.tools),
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


def _vote(f: Feedback) -> records.Feedback:
    return records.Feedback(
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
