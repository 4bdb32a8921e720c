"""`prefloop refresh`: one refresh now, in the foreground, with its steps and training
progress shown."""

from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING

from service.core.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine as Database


def add_parser(sub: argparse._SubParsersAction) -> None:
    refresh = sub.add_parser(
        "refresh", help="run one refresh now: compile, train, evaluate, gate, promote"
    )
    refresh.add_argument("--segment", default="default")
    refresh.add_argument("--actor", default="cli")
    refresh.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """One refresh now, in the foreground, with its steps and training progress shown."""
    from adapters.registry import Registry
    from service.loop.refresh import run_refresh
    from service.loop.runs import create_run
    from service.storage.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    init_db(db, auto_upgrade=settings.db_auto_upgrade)
    registry = Registry(db, settings.adapters_dir)
    run = create_run(db, segment=args.segment, trigger="manual", actor=args.actor)
    print(f"refresh {run.id} (segment {args.segment})")
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(db, run.id, done), daemon=True)
    watcher.start()
    try:
        run = run_refresh(settings, db, registry, run.id)
    finally:
        done.set()
        watcher.join()
        db.dispose()
    for step in run.steps:
        print(f"  {step['name']:<9} {step['seconds'] or 0:8.1f} s  {step.get('detail', '')}")
    verdict = run.verdict or {}
    for reason in verdict.get("reasons", []):
        print(f"  gate: {reason}")
    print(
        f"{run.status}"
        + (f" ({run.outcome})" if run.outcome else "")
        + (f": {run.error}" if run.error else "")
        + (f"; candidate {run.candidate_version}" if run.candidate_version else "")
    )
    return 0 if run.status in ("succeeded", "skipped") else 1


def _watch(db: Database, run_id: str, done: threading.Event) -> None:
    """Print each step as it starts, and a progress bar while training, until `done`."""
    from tqdm import tqdm

    from service.loop.runs import get_run

    stage, bar = None, None
    while not done.wait(0.5):
        now = get_run(db, run_id)
        if now is None:
            continue
        if now.stage != stage:
            stage = now.stage
            if bar is not None:
                bar.close()
                bar = None
            if stage:
                tqdm.write(f"- {stage}")
        p = now.progress
        if stage == "train" and p.get("total"):
            if bar is None:
                bar = tqdm(total=p["total"], desc="train", leave=False)
            bar.n = p["step"]
            bar.set_postfix(loss=f"{p.get('loss', 0):.4f}", margin=f"{p.get('margin', 0):.3f}")
    if bar is not None:
        bar.close()
