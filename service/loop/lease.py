"""The refresh lease: one database row that lets one refresh run at a time across every replica
and worker. The holder renews it while it works, so a crashed holder's lease simply expires."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from adapters.registry import as_utc
from service.storage.tables import Lease, utcnow

LEASE = "refresh"
HOLDER = f"{socket.gethostname()}:{os.getpid()}"


def acquire_lease(db: Database, holder: str, ttl: float, name: str = LEASE) -> str | None:
    """Take the lease if it is free, expired or already ours; returns None on success, else who
    holds it.

    Taking an existing row is one conditional UPDATE, so two processes racing for an expired
    lease cannot both win: on Postgres the second UPDATE waits for the first's row lock, then
    finds the row no longer expired; on SQLite transactions are serialized (BEGIN IMMEDIATE).
    Creating the row races on its primary key instead."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl)
    with Session(db) as s:
        taken = s.exec(
            update(Lease)
            .where(
                col(Lease.name) == name,
                or_(col(Lease.holder) == holder, col(Lease.expires_at) <= now),
            )
            .values(holder=holder, expires_at=expires, acquired_at=now)
        ).rowcount
        if taken:
            s.commit()
            return None
        row = s.get(Lease, name)
        if row is not None:
            return f"{row.holder} (until {as_utc(row.expires_at).isoformat(timespec='seconds')})"
        s.add(Lease(name=name, holder=holder, expires_at=expires, acquired_at=now))
        try:
            s.commit()
        except IntegrityError:  # another process inserted it first
            return "another process"
    return None


def renew_lease(db: Database, holder: str, ttl: float, name: str = LEASE) -> bool:
    with Session(db) as s:
        result = s.exec(
            update(Lease)
            .where(col(Lease.name) == name, col(Lease.holder) == holder)
            .values(expires_at=utcnow() + timedelta(seconds=ttl))
        )
        s.commit()
        return result.rowcount == 1


def release_lease(db: Database, holder: str, name: str = LEASE) -> None:
    with Session(db) as s:
        row = s.get(Lease, name)
        if row is not None and row.holder == holder:
            s.delete(row)
            s.commit()


def keep_renewing(
    db: Database, holder: str, ttl: float, on_lost: Callable[[], None]
) -> threading.Event:
    """Renew the lease every `ttl` / 3 on a daemon thread until the returned event is set; a
    failed renewal (another process took it) calls `on_lost` and stops renewing."""
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl / 3):
            if not renew_lease(db, holder, ttl):
                on_lost()
                return

    threading.Thread(target=heartbeat, name="refresh-lease", daemon=True).start()
    return stop


def dead_holder(holder: str | None) -> bool:
    """A holder ("host:pid") that is this process just started, or a process of this host that
    no longer exists."""
    if holder is None or holder == HOLDER:
        return True
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
