"""What a run writes: resumable checkpoints, the metrics log, and the finished adapter directory
(PEFT layout plus ``manifest.json``, renamed into place in one step)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data import file_sha256
from trainer.distributed import (
    Dist,
    full_trainable_state,
    load_optimizer_state,
    load_trainable_state_,
    optimizer_state,
)

MANIFEST_FORMAT = "prefloop-adapter/1"


def save_checkpoint(
    path: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ref: torch.Tensor,
    cfg: TrainConfig,
    data_sha256: str,
    d: Dist,
) -> None:
    """Every process calls it (under FSDP2 the state is gathered); the main one writes."""
    state = {
        "step": step,
        "config": asdict(cfg),
        "data_sha256": data_sha256,
        "trainable": full_trainable_state(model),
        "optimizer": optimizer_state(model, optimizer, d),
        "reference_logps": ref,
        "rng": torch.get_rng_state(),
    }
    if not d.main:
        return
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    data_sha256: str,
    d: Dist,
) -> tuple[int, torch.Tensor]:
    # weights_only: a checkpoint is tensors, numbers and strings; never unpickle code from disk.
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    saved["lora_targets"] = tuple(saved["lora_targets"])
    assert saved == asdict(cfg), "resuming needs the same TrainConfig as the interrupted run"
    assert state["data_sha256"] == data_sha256, "resuming needs the same training data"
    load_trainable_state_(model, state["trainable"])
    load_optimizer_state(model, optimizer, state["optimizer"], d)
    torch.set_rng_state(state["rng"])
    return state["step"], state["reference_logps"]


def log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint we resume from: they will be written again."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def last_eval(log_path: Path) -> dict[str, float]:
    """Held-out metrics before training (step 0) and after the last epoch."""
    if not log_path.exists():
        return {}
    evals = [json.loads(x) for x in log_path.read_text().splitlines() if '"eval"' in x]
    if not evals:
        return {}
    return {"before": evals[0], "after": evals[-1]}


def save_adapter(
    model: torch.nn.Module,
    lora: dict[str, torch.Tensor],
    work: Path,
    out: Path,
    manifest: dict[str, Any],
) -> Path:
    """Write the adapter (``lora``: the whole trainable state, ``full_trainable_state``) and
    its manifest into ``work``, then rename it to ``out`` (atomic on one filesystem).
    ``manifest`` gets the format, the time, versions and the weights' hash. The file is the
    same fp32 PEFT adapter whatever the base precision or sharding was."""
    model.save_pretrained(work, state_dict=lora)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        **manifest,
        "versions": _versions(),
        "adapter_sha256": file_sha256(work / "adapter_model.safetensors"),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(work, out)
    return out


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
