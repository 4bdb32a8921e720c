"""`prefloop train ...`: the trainer's command line, with the configured base model."""

from __future__ import annotations

import argparse

from service.core.config import get_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train a LoRA adapter on DPO/KTO JSONL rows (see `prefloop train -h`)",
        add_help=False,
    )
    train.add_argument("trainer_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
