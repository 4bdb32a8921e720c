"""`prefloop users delete USER`: remove a user's data and keep them out of training."""

from __future__ import annotations

import argparse

from service.core.config import get_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    users = sub.add_parser("users", help="end users' data")
    u_sub = users.add_subparsers(dest="users_command", required=True)
    p = u_sub.add_parser(
        "delete", help="delete a user's conversations and feedback; exclude them from training"
    )
    p.add_argument("user")
    p.add_argument("--tenant", default="default")
    p.add_argument("--actor", default="cli")
    users.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`prefloop users delete USER`: remove a user's data and keep them out of training."""
    from service.privacy import delete_user
    from service.storage.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    init_db(db)
    try:
        counts = delete_user(db, user_id=args.user, tenant=args.tenant, actor=args.actor)
    finally:
        db.dispose()
    print(f"deleted user {args.user!r} (tenant {args.tenant}): "
          + ", ".join(f"{v} {k}" for k, v in counts.items()))  # fmt: skip
    return 0
