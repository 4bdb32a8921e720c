"""Typed dependencies: route signatures read as documentation.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker
thread, two thread hand-offs per dependency for a getattr (measured: a fifth of the CPU of a
feedback write).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.engine import Engine as Database

from service.core.config import Settings
from service.core.db import GroupCommit
from service.engines.base import Engine
from service.routing import AdapterRouter


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


@dataclass(frozen=True)
class Author:
    """Who is sending feedback: a user, or an operator (writing ideal answers)."""

    role: str  # user|operator
    name: str | None  # the operator's name; users name themselves with the `user` field


async def get_operator(x_operator: Annotated[str | None, Header(max_length=256)] = None) -> str:
    """The operator behind an operator-API call.

    No authentication yet: the `X-Operator` header names them (a body's `operator` field may
    override it), for the audit log. The API-key issue turns this one dependency into the key and
    role check, so every operator route is already behind it.
    """
    return x_operator or "operator"


async def get_author(x_operator: Annotated[str | None, Header(max_length=256)] = None) -> Author:
    """Feedback from a caller that names an operator (`X-Operator`) is an operator's: their edits
    become training pairs; a user's edits are kept but not trained on by default."""
    return Author("operator", x_operator) if x_operator else Author("user", None)


OperatorDep = Annotated[str, Depends(get_operator)]
AuthorDep = Annotated[Author, Depends(get_author)]
