"""`prefloop serve`: the OpenAI-compatible chat service."""

from __future__ import annotations

import argparse
import sys

from service.core.config import get_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the OpenAI-compatible chat service")
    serve.add_argument("--host", help="overrides PREFLOOP_HOST (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="overrides PREFLOOP_PORT (default 8000)")
    serve.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
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
