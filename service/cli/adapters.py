"""`prefloop adapters ...`: the registry, from any process. A serving replica notices a
promotion or rollback made here within PREFLOOP_ADAPTER_POLL_SECONDS."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.core.config import Settings, get_settings

if TYPE_CHECKING:
    from adapters.registry import Registry


def add_parser(sub: argparse._SubParsersAction) -> None:
    adapters = sub.add_parser("adapters", help="adapter versions: list, gate, promote, rollback")
    adapters.add_argument("--actor", default="cli", help="who is acting, for the audit log")
    a_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    p = a_sub.add_parser("list", help="versions, newest first")
    p.add_argument("--segment")
    p.add_argument("--status", choices=["candidate", "approved", "active", "retired", "rejected"])
    p = a_sub.add_parser("show", help="one version: manifest, evaluation, verdict, history")
    p.add_argument("version", help="e.g. default@v3")
    p = a_sub.add_parser("register", help="copy a PEFT adapter directory in as a candidate")
    p.add_argument("path")
    p.add_argument("--segment", default="default")
    p.add_argument("--parent", help="the version it was warm-started from")
    p.add_argument("--reason")
    p = a_sub.add_parser(
        "gate", help="evaluate a candidate against the active version; approve or reject it"
    )
    p.add_argument("version")
    p.add_argument("--pairs", help="held-out DPO rows (JSONL) to score")
    for name, text in (("approve", "approve a candidate by hand"), ("reject", "reject it")):
        p = a_sub.add_parser(name, help=text)
        p.add_argument("version")
        p.add_argument("--reason")
    p = a_sub.add_parser("promote", help="make an approved (or retired) version active")
    p.add_argument("version")
    p.add_argument("--reason")
    p.add_argument(
        "--expect-active",
        metavar="VERSION",
        help='fail unless this version ("base": the base model) is the one being replaced',
    )
    p = a_sub.add_parser("rollback", help="reactivate the active version's predecessor")
    p.add_argument("--segment", default="default")
    p.add_argument("--to", help="a specific retired version")
    p.add_argument("--reason")
    a_sub.add_parser("gc", help="apply retention: delete old retired and rejected files")
    adapters.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adapters.registry import Registry, RegistryError
    from service.storage.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    try:
        init_db(db, auto_upgrade=settings.db_auto_upgrade)
        registry = Registry(db, settings.adapters_dir)
        COMMANDS[args.adapters_command](args, settings, registry)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def _list(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    rows = registry.list(segment=args.segment, status=args.status)
    print(f"{'VERSION':<24} {'STATUS':<10} {'CREATED':<20} REASON")
    for r in rows:
        when = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{r.id:<24} {r.status:<10} {when:<20} {r.status_reason or ''}")


def _show(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    row = registry.get(args.version)
    out = row.model_dump(mode="json")
    out["events"] = [e.model_dump(mode="json") for e in registry.events(args.version)]
    print(json.dumps(out, indent=2))


def _register(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    row = registry.register(
        args.path, segment=args.segment, parent=args.parent, actor=args.actor, reason=args.reason
    )
    print(f"{row.id} {row.status} {row.path}")


def _gate(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    from service.loop.refresh import gate_version

    heldout = None
    if args.pairs:
        lines = open(args.pairs).read().splitlines()  # noqa: SIM115 - small file
        heldout = [json.loads(x) for x in lines if x.strip()]
    row, verdict = gate_version(settings, registry, args.version, heldout=heldout, actor=args.actor)
    for check in verdict.checks:
        print(f"  [{'pass' if check.passed else 'FAIL'}] {check.detail}")
    print(f"{row.id} {row.status}")


def _approve_or_reject(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    from adapters.registry import APPROVED, REJECTED

    to = APPROVED if args.adapters_command == "approve" else REJECTED
    row = registry.transition(args.version, to, actor=args.actor, reason=args.reason)
    print(f"{row.id} {row.status}")


def _promote(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    from adapters.registry import expected

    row = registry.promote(
        args.version,
        actor=args.actor,
        reason=args.reason,
        expect_active=expected(args.expect_active),
    )
    print(f"{row.id} {row.status} (replaced {row.previous or 'the base model'})")


def _rollback(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    row = registry.rollback(args.segment, to=args.to, actor=args.actor, reason=args.reason)
    print(f"{args.segment}: now {row.id if row else 'the base model'}")


def _gc(args: argparse.Namespace, settings: Settings, registry: Registry) -> None:
    deleted = registry.collect_garbage(settings.retention)
    print(f"deleted the files of {len(deleted)} versions: {', '.join(deleted) or '-'}")


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, Registry], None]] = {
    "list": _list,
    "show": _show,
    "register": _register,
    "gate": _gate,
    "approve": _approve_or_reject,
    "reject": _approve_or_reject,
    "promote": _promote,
    "rollback": _rollback,
    "gc": _gc,
}
