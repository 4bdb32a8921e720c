"""`prefloop keys create|list|revoke`: API keys, in the configured database."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from service.core.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine as Database


def add_parser(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    k_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = k_sub.add_parser("create", help="create a key; prints the secret once")
    p.add_argument("--name", required=True, help="who holds it (an operator's name in the log)")
    p.add_argument("--role", choices=["user", "operator", "admin"], default="user")
    p.add_argument("--tenant", default="default")
    p.add_argument(
        "--public", action="store_true", help="a widget key: chat and feedback, from --origin only"
    )
    p.add_argument(
        "--origin", action="append", default=[], help="allowed browser origin (repeatable)"
    )
    k_sub.add_parser("list", help="every key (never the secrets)")
    p = k_sub.add_parser("revoke", help="revoke a key by id or prefix")
    p.add_argument("key")
    keys.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`prefloop keys create|list|revoke`: API keys, in the configured database."""
    from service.auth import list_keys, revoke_key
    from service.storage.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    init_db(db)
    try:
        if args.keys_command == "create":
            return _create(args, db, settings.auth)
        if args.keys_command == "list":
            for k in list_keys(db):
                state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                extra = f" public {' '.join(k.origins)}" if k.public else ""
                print(f"{k.id}  {k.prefix}…  {k.role:<8} {k.tenant:<12} {k.name}  {state}{extra}")
        else:
            row = revoke_key(db, args.key)
            if row is None:
                print(f"error: no key {args.key!r} (give its id or prefix)", file=sys.stderr)
                return 1
            print(f"revoked {row.id} ({row.name}); replicas refuse it within seconds")
    finally:
        db.dispose()
    return 0


def _create(args: argparse.Namespace, db: Database, auth: str) -> int:
    from service.auth import create_key

    try:
        row, secret = create_key(
            db,
            name=args.name,
            role=args.role,
            tenant=args.tenant,
            public=args.public,
            origins=args.origin,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(secret)
    print(
        f"key {row.id} ({row.role}, tenant {row.tenant}"
        f"{', public from ' + ' '.join(row.origins) if row.public else ''}): the secret "
        "above is shown once; store it now.",
        file=sys.stderr,
    )
    if auth != "keys":
        print("note: PREFLOOP_AUTH is off; set PREFLOOP_AUTH=keys to require keys.",
              file=sys.stderr)  # fmt: skip
    return 0
