"""Who is calling: the roles and the caller's identity that authentication (`service.auth`)
produces and every layer below it checks ownership with."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Role(IntEnum):
    user = 1
    operator = 2
    admin = 3


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's holder, or anyone in development mode (`key_id` None)."""

    key_id: str | None
    name: str
    role: Role
    tenant: str
    public: bool = False
    origins: tuple[str, ...] = ()
    visitor: str | None = None  # public keys: the server-issued visitor id (see VisitorIds)

    @property
    def dev(self) -> bool:
        return self.key_id is None

    @property
    def visitor_user(self) -> str | None:
        """A widget visitor's user id: issued by the server, never taken from the request."""
        return f"visitor:{self.visitor}" if self.public and self.visitor else None

    @property
    def scope(self) -> str | None:
        """The tenant whose data this caller may see; None: every tenant (admins)."""
        return None if self.role >= Role.admin else self.tenant

    def sees_tenant(self, tenant: str) -> bool:
        return self.role >= Role.admin or tenant == self.tenant

    def owns(self, key_id: str | None, tenant: str, user_id: str | None = None) -> bool:
        """May this caller read, regenerate or rate a completion asked for by `key_id` (for
        `user_id`)? Widget visitors: only their own; users: their key's; operators: their
        tenant's; admins and dev mode: all."""
        if self.role >= Role.admin:
            return True
        if self.role >= Role.operator:
            return tenant == self.tenant
        mine = key_id == self.key_id and tenant == self.tenant
        return mine and (not self.public or user_id == self.visitor_user)
