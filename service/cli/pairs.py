"""`prefloop pairs export`: compile new feedback, then write the stored rows as JSONL."""

from __future__ import annotations

import argparse

from service.core.config import get_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    pairs = sub.add_parser("pairs", help="training pairs compiled from feedback")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", required=True)
    export = pairs_sub.add_parser(
        "export",
        help="compile new feedback, then write TRL conversational JSONL (DPO pairs or KTO rows)",
    )
    export.add_argument("--format", choices=["dpo", "kto"], required=True)
    export.add_argument("--out", required=True, help="the .jsonl file to write (atomically)")
    export.add_argument(
        "--status",
        nargs="+",
        choices=["approved", "pending", "excluded", "used"],
        default=["approved"],
        help="which stored rows to export (default: approved)",
    )
    export.add_argument(
        "--no-compile", action="store_true", help="export what is stored; compile nothing new"
    )
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from service.feedback import compile_and_store
    from service.loop.stored_pairs import export_pairs
    from service.storage.db import init_db, make_engine

    settings = get_settings()  # the same settings `prefloop serve` reads
    db = make_engine(settings)
    try:
        init_db(db, auto_upgrade=settings.db_auto_upgrade)
        if not args.no_compile:
            summary = compile_and_store(db, settings, actor="cli")
            dropped = ", ".join(f"{k}={v}" for k, v in sorted(summary.dropped.items())) or "none"
            print(
                f"compiled: {summary.pairs} new pairs, {summary.unpaired} new KTO rows, "
                f"{summary.excluded} excluded; dropped: {dropped}"
            )
        count = export_pairs(db, fmt=args.format, out=args.out, statuses=args.status)
    finally:
        db.dispose()
    print(f"wrote {count} {args.format} rows ({', '.join(args.status)}) to {args.out}")
    return 0
