"""Live canary experiments as stored: their statuses and the queries the watch, the API and the
adapter routing read them with."""

from __future__ import annotations

from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from service.storage.tables import Experiment

RUNNING, PROMOTED, ROLLED_BACK, STOPPED = "running", "promoted", "rolled_back", "stopped"


def list_experiments(
    db: Database,
    *,
    tenant: str | None = None,
    segment: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[Experiment]:
    """Experiments, newest first; `tenant` None: every tenant's."""
    q = select(Experiment)
    for column, value in ((Experiment.tenant, tenant), (Experiment.segment, segment)):
        if value is not None:
            q = q.where(column == value)
    if status is not None:
        q = q.where(Experiment.status == status)
    q = q.order_by(col(Experiment.started_at).desc()).limit(limit)
    with Session(db, expire_on_commit=False) as s:
        return list(s.exec(q).all())


def running(db: Database) -> list[Experiment]:
    return list_experiments(db, status=RUNNING, limit=10_000)
