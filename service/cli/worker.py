"""`prefloop worker`: the refresh scheduler without the HTTP server."""

from __future__ import annotations

import argparse

from service.core.config import get_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="run the refresh scheduler without serving")
    worker.set_defaults(func=run)


def run(_args: argparse.Namespace) -> int:
    """The refresh scheduler without the HTTP server (replicas notice promotions by polling)."""
    import signal
    import threading

    from adapters.registry import Registry
    from service.loop.scheduler import Refresher
    from service.storage.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    init_db(db, auto_upgrade=settings.db_auto_upgrade)
    refresher = Refresher(settings, db, Registry(db, settings.adapters_dir))
    refresher.start_schedule()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"prefloop worker: refresh {settings.refresh_cron!r} ({settings.refresh_timezone}), "
          f"threshold {settings.refresh_threshold_pairs} items (pairs and thumbs)")  # fmt: skip
    stop.wait()
    refresher.shutdown()
    db.dispose()
    return 0
