"""`prefloop db ...`: the schema's migrations (Alembic) on PREFLOOP_DATABASE_URL."""

from __future__ import annotations

import argparse
import sys

from service.core.config import get_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="schema migrations (Alembic) of PREFLOOP_DATABASE_URL")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    p = db_sub.add_parser("upgrade", help="apply pending migrations (back up first)")
    p.add_argument("revision", nargs="?", default="head")
    db_sub.add_parser("current", help="the database's revision and what is pending")
    db_sub.add_parser("history", help="every migration, newest first")
    db_sub.add_parser("check", help="exit 1 if the models differ from the database's schema")
    p = db_sub.add_parser("revision", help="(developers) autogenerate a migration from the models")
    p.add_argument("-m", "--message", required=True)
    db.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`prefloop db ...`: the schema's migrations (Alembic) on PREFLOOP_DATABASE_URL."""
    from service.storage import migrate as migrations
    from service.storage.db import make_engine

    settings = get_settings()
    db = make_engine(settings)
    url = db.url.render_as_string(hide_password=True)
    try:
        if args.db_command == "upgrade":
            before, after = migrations.upgrade(db, args.revision)
            print(f"{url}: {before or 'empty'} -> {after}")
        elif args.db_command == "current":
            with db.connect() as conn:
                cur = migrations.current(conn)
                todo = migrations.pending(conn)
            print(f"{url}: {cur or 'empty (no migrations applied)'}; head {migrations.head()}")
            for rev in todo:
                kind = "additive" if getattr(rev.module, "additive", False) else "needs upgrade"
                print(f"  pending {rev.revision} ({kind}): {rev.doc}")
        elif args.db_command == "history":
            for rev in migrations.scripts().walk_revisions():
                print(f"{rev.revision:<8} {rev.doc}")
        elif args.db_command == "check":
            diffs = migrations.diff(db)
            for d in diffs:
                print(f"  {d}")
            if diffs:
                print("the models differ from the database: write a migration", file=sys.stderr)
                return 1
            print(f"{url}: the schema matches the models")
        elif args.db_command == "revision":
            migrations.revision(db, args.message)
    except migrations.MigrationRequired as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0
