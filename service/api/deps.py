"""Typed dependencies: route signatures read as documentation.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker
thread, two thread hand-offs per dependency for a getattr (measured: a fifth of the CPU of a
feedback write).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine as Database

from service.api.middleware import VISITOR_HEADER
from service.auth import KeyStore
from service.core.config import Settings
from service.core.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
)
from service.core.identity import Principal, Role
from service.engines.base import Engine
from service.engines.routing import AdapterRouter
from service.feedback import Author
from service.storage.db import GroupCommit


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_router(request: Request) -> AdapterRouter:
    return request.app.state.router


async def get_writer(request: Request) -> GroupCommit:
    return request.app.state.writer


SettingsDep = Annotated[Settings, Depends(get_settings)]
WriterDep = Annotated[GroupCommit, Depends(get_writer)]
DbDep = Annotated[Database, Depends(get_db)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RouterDep = Annotated[AdapterRouter, Depends(get_router)]


async def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


KeysDep = Annotated[KeyStore, Depends(get_keys)]
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key from `prefloop keys create` (not needed with PREFLOOP_AUTH=off).",
)


async def get_principal(
    request: Request,
    settings: SettingsDep,
    keys: KeysDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    x_operator: Annotated[str | None, Header(max_length=256)] = None,
) -> Principal:
    """The caller, from the `Authorization: Bearer <key>` header; counts against its key's
    request rate. In development mode (no keys) everyone is an admin, named by `X-Operator`."""
    if settings.auth == "off":
        return Principal(
            key_id=None, name=x_operator or "operator", role=Role.admin, tenant="default"
        )
    if credentials is None:
        raise AuthenticationError(
            "no API key: send `Authorization: Bearer <key>` (an operator creates keys with "
            "`prefloop keys create`)"
        )
    hit, principal = keys.cached(credentials.credentials)
    if not hit:
        principal = await run_in_threadpool(keys.lookup, credentials.credentials)
    if principal is None:
        raise AuthenticationError(
            "the API key is unknown or revoked; ask an operator for a new one"
        )
    wait = request.app.state.request_limiter.take(principal.key_id)
    if wait:
        raise RateLimitError(
            f"too many requests for this key (limit {settings.rate_limit_requests_per_minute} "
            f"per minute); retry in {wait} s",
            retry_after_s=wait,
        )
    if principal.public:
        principal = _visitor(request, settings, principal)
    return principal


def _visitor(request: Request, settings: Settings, principal: Principal) -> Principal:
    """A widget caller: its visitor id from the signed `X-Prefloop-Visitor` token, or a new one
    (sent back in that header); limits per visitor and per client address as well as per key."""
    state = request.app.state
    address = request.client.host if request.client else "unknown"
    token = request.headers.get(VISITOR_HEADER, "")
    visitor = state.visitors.verify(principal.key_id, token) if token else None
    limits = [(state.address_limiter, f"ip:{address}", "from this address")]
    if visitor is None:
        limits.append((state.new_visitor_limiter, f"new:{address}", "new visitors from here"))
    for limiter, bucket, what in limits:
        if wait := limiter.take(bucket):
            raise RateLimitError(f"too many requests {what}; retry in {wait} s", retry_after_s=wait)
    if visitor is None:
        visitor, token = state.visitors.issue(principal.key_id)
        request.state.visitor_token = token  # the widget middleware sends it back
    if wait := state.visitor_limiter.take(f"{principal.key_id}:{visitor}"):
        raise RateLimitError(
            f"too many requests from this visitor (limit "
            f"{settings.rate_limit_visitor_requests_per_minute} per minute); retry in {wait} s",
            retry_after_s=wait,
        )
    return replace(principal, visitor=visitor)


def require(role: Role, *, public: bool = False) -> Callable[..., Awaitable[Principal]]:
    """The one role check. `public`: widget keys may call this route (from their origins)."""

    async def check(
        request: Request, principal: Annotated[Principal, Depends(get_principal)]
    ) -> Principal:
        if principal.public:
            origin = (request.headers.get("origin") or "").rstrip("/")
            if not public:
                raise PermissionDeniedError(
                    "a public (widget) key may only chat and send feedback; use a user or "
                    "operator key for this"
                )
            if origin not in principal.origins:
                raise PermissionDeniedError(
                    f"this public key works only from {', '.join(principal.origins)}, "
                    f"not from {origin or 'a request without an Origin header'}"
                )
        if principal.role < role:
            raise PermissionDeniedError(
                f"this needs an {role.name} key; yours is a {principal.role.name} key"
            )
        return principal

    return check


CallerDep = Annotated[Principal, Depends(require(Role.user, public=True))]
UserDep = Annotated[Principal, Depends(require(Role.user))]
OperatorDep = Annotated[Principal, Depends(require(Role.operator))]
AdminDep = Annotated[Principal, Depends(require(Role.admin))]


async def get_author(
    caller: CallerDep, x_operator: Annotated[str | None, Header(max_length=256)] = None
) -> Author:
    """Feedback from an operator key (in development mode: a caller naming an operator with
    `X-Operator`) is an operator's: their edits become training pairs; a user's edits are kept
    but not trained on by default."""
    if caller.dev:
        return (
            Author("operator", x_operator, caller) if x_operator else Author("user", None, caller)
        )
    if caller.role >= Role.operator:
        return Author("operator", caller.name, caller)
    return Author("user", None, caller)


def actor(principal: Principal, named: str | None = None) -> str:
    """The audit log's actor: the key's holder. Only development mode lets a body name one."""
    return (named or principal.name) if principal.dev else principal.name


AuthorDep = Annotated[Author, Depends(get_author)]


def _query_names(dependant: Any) -> Iterator[str]:
    """The query parameters of a route and of every dependency under it."""
    yield from (p.alias for p in dependant.query_params)
    for sub in dependant.dependencies:
        yield from _query_names(sub)


async def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not know is a 400, not silently ignored: a misspelt
    filter (`?stauts=approved`) would otherwise return everything."""
    route = request.scope.get("route")
    if route is None or not request.query_params:
        return
    known = getattr(route, "_known_query", None)
    if known is None:
        known = set(_query_names(route.dependant))
        route._known_query = known  # the same for every request: work it out once
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidRequestError(
            f"unknown query parameter(s): {', '.join(map(repr, unknown))}"
            + (f"; this route takes {', '.join(sorted(known))}" if known else ""),
            param=unknown[0],
        )
