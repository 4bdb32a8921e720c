from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service.api.deps import CallerDep, DbDep, EngineDep, RouterDep, SettingsDep
from service.api.protocol import ChatCompletionRequest, ChatCompletionResponse, StoredCompletion
from service.auth import Principal
from service.chat import (
    ChatPlan,
    as_duel,
    complete_chat,
    plan_chat,
    read_completion,
    stream_chat,
    wants_duel,
)
from service.core.config import Settings
from service.core.errors import ModelNotFoundError, RateLimitError
from service.engines.routing import Lease

router = APIRouter(prefix="/v1", tags=["chat"])


def _plan(
    request: Request,
    body: ChatCompletionRequest,
    settings: Settings,
    engine: EngineDep,
    leases: list[Lease],
    principal: Principal,
    experiment: str | None,
) -> ChatPlan:
    lease = leases[0]
    if not principal.sees_tenant(settings.tenant_of(lease.segment)):
        # Another tenant's segment (or a version of it) does not exist for this caller.
        raise ModelNotFoundError(f"the model {body.model!r} does not exist", param="model")
    plan = plan_chat(body, settings, engine, lease.adapter, lease.segment)
    if experiment is not None:  # a head-to-head turn: one answer from each arm
        plan = as_duel(plan, experiment, leases[1].adapter)
    if principal.key_id is not None:
        cost = plan.params.max_tokens * plan.params.n
        wait = request.app.state.token_limiter.take(principal.key_id, cost)
        if wait:
            raise RateLimitError(
                f"this key's token budget ({settings.rate_limit_tokens_per_minute} tokens per "
                f"minute, counted as max_tokens x n) is spent; retry in {wait} s or ask for "
                "fewer tokens",
                retry_after_s=wait,
            )
    return plan


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    request: Request,
    body: ChatCompletionRequest,
    settings: SettingsDep,
    db: DbDep,
    engine: EngineDep,
    adapters: RouterDep,
    principal: CallerDep,
) -> ChatCompletionResponse | StreamingResponse:
    # The lease keeps the adapter loaded until this request's generation is over, even if a
    # promotion flips the route meanwhile (see service.engines.routing).
    # A running canary splits the segment per end user: the widget's server-issued visitor,
    # else the caller's `user`, else the key (see service.engines.routing).
    subject = principal.visitor_user or body.user or principal.key_id
    leases = [adapters.lease(body.model, subject)]
    # A widget's "which is better?" turn may be a head-to-head: a lease on each arm.
    rival = adapters.rival(body.model, leases[0]) if wants_duel(body, principal, settings) else None
    experiment = rival[0] if rival else None
    leases += [rival[1]] if rival else []
    if not body.stream:
        try:
            plan = _plan(request, body, settings, engine, leases, principal, experiment)
            return await complete_chat(db, engine, plan, body, principal)
        finally:
            _release(leases)
    try:
        plan = _plan(request, body, settings, engine, leases, principal, experiment)
        events = await stream_chat(db, engine, plan, body, principal)
    except BaseException:
        _release(leases)
        raise
    return StreamingResponse(
        _holding(leases, events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _release(leases: list[Lease]) -> None:
    for lease in leases:
        lease.release()


async def _holding(leases: list[Lease], events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        _release(leases)


@router.get("/chat/completions/{completion_id}", response_model=StoredCompletion)
async def get_chat_completion(
    completion_id: Annotated[str, Path(max_length=128)], db: DbDep, principal: CallerDep
) -> StoredCompletion:
    """A stored completion: its status, answers and error. A user key sees only the
    completions it asked for (any other id is a 404); an operator key its tenant's."""
    return await run_in_threadpool(read_completion, db, completion_id, principal)
