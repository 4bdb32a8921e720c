"""API keys, roles and per-key rate limits.

A key is a random secret (`pfk_` + 43 URL-safe characters, 256 bits) shown once at creation;
only its SHA-256 is stored, so a database leak leaks no usable key (a high-entropy secret needs
no slow password hash). Every `/v1` route takes a `Principal` from one dependency
(`service.api.deps.require`), which checks the role: user < operator < admin.

- user: chat, and read / regenerate / rate its own completions (owned by the key that asked).
- operator: also the operator API, for its own tenant's data and segments.
- admin: every tenant; deleting users.
- public (a widget key, role user): chat and feedback only, and only from its origins.

Development mode (`PREFLOOP_AUTH=off`, the default so `make run` works out of the box) has no
keys: every caller is an admin of tenant `default`, named by `X-Operator` for the audit log.
`prefloop serve` refuses it on a non-loopback host.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time
from pathlib import Path

from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from service.core.identity import Principal, Role
from service.storage.db import session_scope
from service.storage.tables import ApiKey, utcnow

SECRET_PREFIX = "pfk_"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    db: Database,
    *,
    name: str,
    role: str = "user",
    tenant: str = "default",
    public: bool = False,
    origins: list[str] | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; returns the row and the secret (shown once, never stored)."""
    if not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", tenant):
        raise ValueError(f"tenant {tenant!r}: use 1-64 lowercase letters, digits, '-' or '_'")
    if role not in Role.__members__:
        raise ValueError(f"role must be one of {', '.join(Role.__members__)}, not {role!r}")
    if public and role != "user":
        raise ValueError("a public (widget) key has role user")
    if public and not origins:
        raise ValueError("a public key needs its allowed origins (--origin https://example.com)")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        prefix=secret[:10],
        hash=hash_secret(secret),
        role=role,
        tenant=tenant,
        public=public,
        origins=[o.rstrip("/") for o in origins or []],
    )
    with session_scope(db) as session:
        session.add(row)
    return row, secret


def list_keys(db: Database) -> list[ApiKey]:
    with Session(db) as session:
        return list(session.exec(select(ApiKey).order_by(col(ApiKey.created_at))).all())


def revoke_key(db: Database, key: str) -> ApiKey | None:
    """Revoke by id or by the prefix shown in `prefloop keys list`; None if no such key."""
    with session_scope(db) as session:
        row = (
            session.get(ApiKey, key)
            or session.exec(select(ApiKey).where(ApiKey.prefix == key)).first()
        )
        if row is None:
            return None
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.add(row)
        return row


class KeyStore:
    """Key lookups by hash, cached for `ttl` seconds: a revocation (from any process) takes
    effect within `ttl`, and a busy key costs no database read per request."""

    def __init__(self, db: Database, ttl: float = 5.0):
        self.db = db
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._origins: tuple[float, frozenset[str]] | None = None
        self._lock = threading.Lock()

    def lookup(self, secret: str) -> Principal | None:
        digest = hash_secret(secret)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        with Session(self.db) as session:
            row = session.exec(select(ApiKey).where(ApiKey.hash == digest)).first()
        principal = None
        if row is not None and row.revoked_at is None:
            principal = Principal(
                key_id=row.id,
                name=row.name,
                role=Role[row.role],
                tenant=row.tenant,
                public=row.public,
                origins=tuple(row.origins),
            )
        with self._lock:
            if len(self._cache) > 10_000:  # unknown secrets must not grow it without bound
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal

    def cached(self, secret: str) -> tuple[bool, Principal | None]:
        """(hit, principal) from the cache alone: no database read, safe on the event loop."""
        with self._lock:
            hit = self._cache.get(hash_secret(secret))
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return True, hit[1]
        return False, None

    def public_origins(self) -> frozenset[str]:
        """Every live public key's origins: a CORS preflight carries no key, so it is answered
        for any of them (the request itself is then checked against its own key's list)."""
        now = time.monotonic()
        cached = self._origins
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            with Session(self.db) as session:
                rows = session.exec(
                    select(ApiKey.origins).where(
                        ApiKey.public == True,  # noqa: E712 - SQL, not Python
                        col(ApiKey.revoked_at).is_(None),
                    )
                ).all()
        except Exception:  # noqa: BLE001 - database away: keep what we knew (requests get a 503)
            return cached[1] if cached else frozenset()
        origins = frozenset(o for row in rows for o in row)
        self._origins = (now, origins)
        return origins


class VisitorIds:
    """Server-issued identities for the visitors of a public (widget) key.

    Anyone can send any `user` field, so a widget caller's identity comes from a token the
    server signs: `<visitor id>.<HMAC-SHA256(secret, key id : visitor id)>`. The widget keeps
    it (localStorage) and sends it back in `X-Prefloop-Visitor`; a missing or forged one gets a
    new visitor, and new visitors per client address are rate-limited, so dropping the token
    does not mint identities freely. Bound to the key: a token from one site's widget is
    worthless on another's."""

    def __init__(self, secret: bytes):
        self.secret = secret

    def _sign(self, key_id: str, visitor: str) -> str:
        mac = hmac.new(self.secret, f"{key_id}:{visitor}".encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def issue(self, key_id: str) -> tuple[str, str]:
        """A new (visitor id, token)."""
        visitor = secrets.token_hex(8)
        return visitor, f"{visitor}.{self._sign(key_id, visitor)}"

    def verify(self, key_id: str, token: str) -> str | None:
        visitor, _, sig = token.partition(".")
        if not re.fullmatch(r"[0-9a-f]{16}", visitor) or len(sig) != 32:
            return None
        return visitor if hmac.compare_digest(sig, self._sign(key_id, visitor)) else None


def visitor_secret(configured: str, home: Path) -> bytes:
    """PREFLOOP_VISITOR_SECRET, else a random one kept in PREFLOOP_HOME (created once; replicas
    on separate disks must share one through the setting)."""
    if configured:
        return configured.encode()
    path = home / "visitor.secret"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".visitor.secret.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic: a racing process's secret wins whole, or ours does
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


class RateLimiter:
    """Token buckets per key: `limit` units per `window` seconds, refilled continuously. `take`
    returns 0 when the units are granted, else the seconds to wait (the Retry-After). Per
    process: with N replicas behind a balancer a key gets up to N times the limit."""

    def __init__(self, limit: int, window: float = 60.0):
        self.capacity = float(limit)
        self.rate = limit / window
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (units, at)
        self._lock = threading.Lock()

    def take(self, key: str, units: float = 1.0) -> int:
        if self.capacity <= 0:
            return 0
        units = min(units, self.capacity)  # a request larger than a minute's worth drains it
        now = time.monotonic()
        with self._lock:
            level, at = self._buckets.get(key, (self.capacity, now))
            level = min(self.capacity, level + (now - at) * self.rate)
            if level >= units:
                self._buckets[key] = (level - units, now)
                return 0
            self._buckets[key] = (level, now)
            return max(1, math.ceil((units - level) / self.rate))
