from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.deps import DbDep, EngineDep, SettingsDep
from service.api.protocol import ChatCompletionRequest, ChatCompletionResponse
from service.chat import complete_chat, plan_chat, stream_chat

router = APIRouter(prefix="/v1", tags=["chat"])

TENANT = "default"  # API keys and tenants arrive with the trust-and-safety work


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    body: ChatCompletionRequest, settings: SettingsDep, db: DbDep, engine: EngineDep
) -> ChatCompletionResponse | StreamingResponse:
    plan = plan_chat(body, settings, engine)
    if not body.stream:
        return await complete_chat(db, engine, plan, body, TENANT)
    events = await stream_chat(db, engine, plan, body, TENANT)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
