from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.deps import DbDep, EngineDep, RouterDep, SettingsDep
from service.api.protocol import ChatCompletionRequest, ChatCompletionResponse
from service.chat import complete_chat, plan_chat, stream_chat
from service.routing import Lease

router = APIRouter(prefix="/v1", tags=["chat"])

TENANT = "default"  # API keys and tenants arrive with the trust-and-safety work


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    settings: SettingsDep,
    db: DbDep,
    engine: EngineDep,
    adapters: RouterDep,
) -> ChatCompletionResponse | StreamingResponse:
    # The lease keeps the adapter loaded until this request's generation is over, even if a
    # promotion flips the route meanwhile (see service.routing).
    lease = adapters.lease(body.model)
    if not body.stream:
        try:
            plan = plan_chat(body, settings, engine, lease.adapter, lease.segment)
            return await complete_chat(db, engine, plan, body, TENANT)
        finally:
            lease.release()
    try:
        plan = plan_chat(body, settings, engine, lease.adapter, lease.segment)
        events = await stream_chat(db, engine, plan, body, TENANT)
    except BaseException:
        lease.release()
        raise
    return StreamingResponse(
        _holding(lease, events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _holding(lease: Lease, events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        lease.release()
