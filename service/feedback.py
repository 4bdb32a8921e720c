"""Feedback capture: one signal in, one committed row out.

The route awaits `submit_feedback`, which hands the write to the group-commit thread and returns
after the commit. Each signal is one write in a shared transaction: look up the idempotency
key, check the completion, upsert the user's slot.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from sqlalchemy import Row
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from adapters.registry import as_utc
from service import observability
from service.api.deps import Author
from service.api.schemas import EditFeedback, FeedbackPublic, PickFeedback, ThumbsFeedback
from service.core.db import GroupCommit
from service.core.errors import NotFoundError
from service.storage import crud
from service.storage.models import Feedback


def public(row: Feedback | Row) -> FeedbackPublic:
    """A stored feedback (an ORM object, or a `feedback` table row) as the API shows it."""
    return FeedbackPublic(
        id=row.id,
        type=row.kind,
        completion_id=row.completion_id,
        message_id=row.message_id,
        choice_index=row.choice_index,
        user=row.user_id,
        value=row.value,
        comment=row.comment,
        text=row.edited_text,
        author_role=row.author_role,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


class _CompletionCache:
    """Succeeded completions never change, and feedback on one tends to come in bursts (a
    popular answer, an A/B test): keep the last few thousand and skip two reads per write."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.items: OrderedDict[tuple[str, str], crud.RatedCompletion] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, db: Database, session: object, completion_id: str) -> crud.RatedCompletion:
        key = (str(db.url), completion_id)
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        found = crud.rated_completion(session, completion_id=completion_id)  # type: ignore[arg-type]
        if found.status == "succeeded":
            with self.lock:
                self.items[key] = found
                if len(self.items) > self.size:
                    self.items.popitem(last=False)
        return found


_completions = _CompletionCache()


async def submit_feedback(
    writer: GroupCommit,
    body: ThumbsFeedback | PickFeedback | EditFeedback,
    author: Author,
    idempotency_key: str | None,
) -> tuple[FeedbackPublic, bool]:
    """Store one signal; returns (the stored feedback, whether this was a replayed retry).

    Returns only after the group transaction holding the write has committed.
    """
    digest = crud.request_hash(
        {
            "body": body.model_dump(),
            "author": author.role,
            "by": author.name,
            "key": author.caller.key_id,
        }
    )
    if isinstance(body, ThumbsFeedback):
        choice, value, text = body.choice_index, body.rating, None
    elif isinstance(body, PickFeedback):
        choice, value, text = body.chosen_index, body.chosen_index, None
    else:
        choice, value, text = body.choice_index, 0, body.text

    def write(session: Session) -> tuple[FeedbackPublic, bool]:
        if idempotency_key is not None:
            earlier = crud.feedback_by_idempotency_key(
                session, key=idempotency_key, request_hash=digest
            )
            if earlier is not None:
                return public(earlier), True
        completion = _completions.get(writer.engine, session, body.completion_id)
        if not author.caller.owns(completion.key_id, completion.tenant, completion.user_id):
            # Another key's completion is, to this caller, one that does not exist.
            raise NotFoundError(
                f"completion {body.completion_id!r} not found", param="completion_id"
            )
        row = crud.record_feedback(
            session,
            kind=body.type,
            completion=completion,
            key_id=author.caller.key_id,
            choice_index=choice,
            value=value,
            # A widget visitor is who the server says, whatever `user` the body names.
            user_id=author.caller.visitor_user or body.user or author.name,
            author_role=author.role,
            comment=body.comment,
            edited_text=text,
            idempotency_key=idempotency_key,
            request_hash=digest,
        )
        return public(row), False

    for attempt in range(2):
        try:
            stored, replayed = await writer.write(write)
        except IntegrityError:
            # Another process's first write with the same Idempotency-Key won the race; the
            # retry sees its row and replays it (or answers 409).
            if attempt == 1:
                raise
            continue
        if not replayed:
            observability.FEEDBACK.labels(body.type).inc()
        return stored, replayed
    raise AssertionError("unreachable")
