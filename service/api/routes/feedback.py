from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from service.api.deps import AuthorDep, WriterDep
from service.api.schemas import FeedbackPublic, FeedbackRequest
from service.feedback import submit_feedback

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
    stored, replayed = await submit_feedback(writer, body, author, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return stored
