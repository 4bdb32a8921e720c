"""`prefloop canary ...`: live canaries, from any process (the same functions as the
operator API). Serving replicas pick a change up within PREFLOOP_ADAPTER_POLL_SECONDS."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from service.core.config import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine as Database

    from adapters.registry import Registry


def add_parser(sub: argparse._SubParsersAction) -> None:
    canary = sub.add_parser(
        "canary", help="live canaries: serve a candidate to a share of users before everyone"
    )
    canary.add_argument("--actor", default="cli", help="who is acting, for the audit log")
    c_sub = canary.add_subparsers(dest="canary_command", required=True)
    p = c_sub.add_parser("start", help="canary an approved version beside the active one")
    p.add_argument("candidate", help="an approved version, e.g. default@v4")
    p.add_argument("--share", type=float, help="of end users (default PREFLOOP_CANARY_SHARE)")
    p.add_argument("--policy", help="JSON overrides, e.g. '{\"margin\": 0.02}'")
    p.add_argument(
        "--expect-incumbent",
        metavar="VERSION",
        help='fail unless this version ("base": the base model) is the active one',
    )
    p = c_sub.add_parser("list", help="experiments, newest first")
    p.add_argument("--segment")
    p.add_argument("--status", choices=["running", "promoted", "rolled_back", "stopped"])
    p = c_sub.add_parser("show", help="one experiment: arms, counts, interval, decision")
    p.add_argument("experiment")
    for name, text in (
        ("stop", "end it now; the incumbent stays"),
        ("promote", "promote the candidate now (fenced on the incumbent)"),
        ("rollback", "reject the candidate now"),
    ):
        p = c_sub.add_parser(name, help=text)
        p.add_argument("experiment")
        p.add_argument("--reason")
    canary.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adapters.registry import Registry, RegistryError
    from service.core.errors import PrefloopError
    from service.loop import live_watch
    from service.storage.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    try:
        init_db(db, auto_upgrade=settings.db_auto_upgrade)
        registry = Registry(db, settings.adapters_dir)
        cmd = args.canary_command
        if cmd == "start":
            _start(args, db, registry, settings)
        elif cmd == "list":
            print(f"{'EXPERIMENT':<38} {'STATUS':<12} {'CANDIDATE':<20} {'SHARE':>5}  REASON")
            for e in live_watch.list_experiments(db, segment=args.segment, status=args.status):
                print(
                    f"{e.id:<38} {e.status:<12} {e.candidate:<20} {e.share:>5.0%}  {e.reason or ''}"
                )
        elif cmd == "show":
            exp = live_watch.get(db, args.experiment)
            _, snap = live_watch.look(db, exp)
            out = {**exp.model_dump(mode="json"), "now": snap}
            print(json.dumps(out, indent=2))
        else:
            exp = live_watch.act(
                db, registry, args.experiment, cmd, actor=args.actor, reason=args.reason
            )
            print(f"{exp.id} {exp.status}: {exp.reason}")
    except (PrefloopError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def _start(args: argparse.Namespace, db: Database, registry: Registry, settings: Settings) -> None:
    from adapters.registry import expected
    from service.loop import live_watch

    policy = json.loads(args.policy) if args.policy else None
    exp = live_watch.start(
        db,
        registry,
        settings,
        candidate=args.candidate,
        actor=args.actor,
        share=args.share,
        policy=policy,
        expect_incumbent=... if args.expect_incumbent is None else expected(args.expect_incumbent),
    )
    print(
        f"{exp.id} running: {exp.candidate} on {exp.share:.0%} of {exp.segment} "
        f"against {exp.incumbent or 'the base model'}"
    )
