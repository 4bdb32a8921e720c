"""`/v1/chat/completions`: the OpenAI body in, a routed and planned turn (`service.chat`),
OpenAI's response, stream chunks or stored completion out."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service import chat
from service.api.deps import CallerDep, DbDep, EngineDep, RouterDep, SettingsDep
from service.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    DeltaMessage,
    ResponseMessage,
    StoredCompletion,
    StreamChoice,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from service.chat import (
    ChatPlan,
    ChatRequest,
    as_duel,
    complete_chat,
    plan_chat,
    read_completion,
    stream_chat,
    wants_duel,
)
from service.core.config import Settings
from service.core.errors import ModelNotFoundError, RateLimitError, error_body
from service.core.identity import Principal
from service.engines import base
from service.engines.routing import Lease

router = APIRouter(prefix="/v1", tags=["chat"])


def chat_request(body: ChatCompletionRequest) -> ChatRequest:
    """The OpenAI body as `service.chat` reads it."""
    fmt = body.response_format
    return ChatRequest(
        messages=[m.plain() for m in body.messages],
        model=body.model,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        max_tokens_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=list(body.stop or []),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.logit_bias,
        response_format=fmt.model_dump(by_alias=True, exclude_none=True) if fmt else None,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs,
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=body.tool_choice,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        user=body.user,
        conversation_id=body.conversation_id,
        parent_id=body.parent_id,
        regenerate=body.regenerate,
        unknown=tuple(body.model_extra or {}),
    )


def _plan(
    request: Request,
    body: ChatRequest,
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
    asked = chat_request(body)
    # The lease keeps the adapter loaded until this request's generation is over, even if a
    # promotion flips the route meanwhile (see service.engines.routing).
    # A running canary splits the segment per end user: the widget's server-issued visitor,
    # else the caller's `user`, else the key (see service.engines.routing).
    subject = principal.visitor_user or body.user or principal.key_id
    leases = [adapters.lease(body.model, subject)]
    # A widget's "which is better?" turn may be a head-to-head: a lease on each arm.
    rival = (
        adapters.rival(body.model, leases[0]) if wants_duel(asked, principal, settings) else None
    )
    experiment = rival[0] if rival else None
    leases += [rival[1]] if rival else []
    if not body.stream:
        try:
            plan = _plan(request, asked, settings, engine, leases, principal, experiment)
            return _response(await complete_chat(db, engine, plan, asked, principal))
        finally:
            _release(leases)
    try:
        plan = _plan(request, asked, settings, engine, leases, principal, experiment)
        events = _sse(plan, await stream_chat(db, engine, plan, asked, principal))
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
    found, answers = await run_in_threadpool(read_completion, db, completion_id, principal)
    usage = None
    if found.prompt_tokens is not None:
        usage = _usage(chat.Usage(found.prompt_tokens, found.completion_tokens or 0))
    return StoredCompletion(
        id=found.id,
        created=int(found.created_at.timestamp()),
        model=found.model,
        status=found.status,  # type: ignore[arg-type]
        error=found.error,
        choices=[
            Choice(
                index=m.choice_index or 0,
                message=_message(m.content, m.tool_calls),
                finish_reason=m.finish_reason,
                message_id=m.id,
            )
            for m in answers
        ],
        usage=usage,
        user=found.user_id,
        conversation_id=found.conversation_id,
        adapter_version=found.adapter_version,
    )


# --- from `service.chat`'s results to OpenAI's shapes ----------------------------------------


def _response(result: chat.ChatResult) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=result.id,
        model=result.model,
        choices=[
            Choice(
                index=r.index,
                message=_message(r.text, r.tool_calls),
                finish_reason=r.finish_reason,
                logprobs=_logprobs(result.logprobs[r.index])
                if result.logprobs is not None
                else None,
                message_id=r.message_id,
            )
            for r in result.choices
        ],
        usage=_usage(result.usage),
        conversation_id=result.conversation_id,
        adapter_version=result.adapter_version,
    )


def _usage(u: chat.Usage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def _message(text: str, tool_calls: list[dict[str, Any]] | None) -> ResponseMessage:
    # OpenAI sends null content with tool calls and nothing else.
    return ResponseMessage(
        content=None if tool_calls and not text else text,
        tool_calls=[ToolCall.model_validate(c) for c in tool_calls] if tool_calls else None,
    )


def _logprobs(entries: list[base.TokenLogprob]) -> ChoiceLogprobs:
    """The engine's records in OpenAI's shape."""

    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode(errors="replace")))

    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                **top(e.token, e.logprob).model_dump(),
                top_logprobs=[top(t, lp) for t, lp in e.top],
            )
            for e in entries
        ]
    )


async def _sse(
    plan: ChatPlan, events: AsyncGenerator[chat.StreamEvent, None]
) -> AsyncIterator[str]:
    """A turn's events as server-sent chunks, ending with `[DONE]`."""
    created, cid = int(time.time()), ""

    def chunk(choices: list[StreamChoice], usage: Usage | None = None, **extra: Any) -> str:
        body = ChatCompletionChunk(
            id=cid, created=created, model=plan.model, choices=choices, usage=usage, **extra
        )
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    try:
        async for e in events:
            if isinstance(e, chat.Started):
                cid = e.id
                first = DeltaMessage(role="assistant", content="")
                yield chunk(
                    [StreamChoice(index=i, delta=first, message_id=m)
                     for i, m in enumerate(e.message_ids)],
                    conversation_id=e.conversation_id,
                    adapter_version=e.adapter_version,
                )  # fmt: skip
            elif isinstance(e, base.ChoiceDelta):
                delta = DeltaMessage(content=e.text or None, tool_calls=list(e.tool_calls) or None)
                lp = _logprobs(list(e.logprobs)) if plan.params.logprobs is not None else None
                yield chunk([StreamChoice(index=e.index, delta=delta, logprobs=lp)])
            elif isinstance(e, chat.Failed):
                err = error_body(e.error, "engine_error" if e.stored else "server_error")
                yield f"data: {json.dumps(err)}\n\n"
            else:
                yield chunk(
                    [StreamChoice(index=i, delta=DeltaMessage(), finish_reason=reason)
                     for i, reason in enumerate(e.finish_reasons)]
                )  # fmt: skip
                if e.usage is not None:
                    yield chunk([], usage=_usage(e.usage))
    finally:  # a client that left: the turn stores what it has (see `service.chat`)
        await events.aclose()
    yield "data: [DONE]\n\n"
