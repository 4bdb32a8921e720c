from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from service.api.deps import AuthorDep, WriterDep
from service.api.schemas import (
    EditFeedback,
    FeedbackPublic,
    FeedbackRequest,
    PickFeedback,
    ThumbsFeedback,
)
from service.feedback import Signal, submit_feedback

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post("/feedback", status_code=201, response_model=FeedbackPublic)
async def create_feedback(
    body: FeedbackRequest,
    writer: WriterDep,
    author: AuthorDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FeedbackPublic:
    """Thumbs (default `type`), an A/B `pick` on an `n=2` response, or an `edit` (ideal answer).

    A later signal by the same user on the same answer (pick: the same response) replaces the
    earlier one. With an `Idempotency-Key`, a retried request returns the stored feedback again
    (header `Idempotent-Replayed: true`) instead of writing twice. 201 only after the commit.
    """
    row, replayed = await submit_feedback(writer, _signal(body), author, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return FeedbackPublic.from_row(row)


def _signal(body: ThumbsFeedback | PickFeedback | EditFeedback) -> Signal:
    if isinstance(body, ThumbsFeedback):
        choice, value, text = body.choice_index, body.rating, None
    elif isinstance(body, PickFeedback):
        choice, value, text = body.chosen_index, body.chosen_index, None
    else:
        choice, value, text = body.choice_index, 0, body.text
    return Signal(
        kind=body.type,
        completion_id=body.completion_id,
        choice_index=choice,
        value=value,
        user=body.user,
        comment=body.comment,
        text=text,
        request=body.model_dump(),
    )
