"""`prefloop model prepare`: idempotent, atomic, and a model that answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.engines.modelprep import default_model_dir, is_prepared, prepare_default_model
from tests.conftest import TEST_HOME


def test_prepared_model_is_a_plain_safetensors_hf_directory(smollm2_dir: Path) -> None:
    import json

    assert is_prepared(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config, "the weights are plain fp32, not GGUF-quantised"
    assert (smollm2_dir / "tokenizer.json").is_file()
    assert not list(smollm2_dir.parent.glob(".*tmp-*")), "no temporary directories left behind"


def test_prepare_is_idempotent_and_cleans_interrupted_runs(smollm2_dir: Path) -> None:
    models_dir = smollm2_dir.parent
    stale = models_dir / ".SmolLM2-135M-Instruct.tmp-interrupted"
    stale.mkdir()
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime
    assert prepare_default_model(models_dir, progress=False) == smollm2_dir
    # A prepared model is not converted again: its weights file is the same file.
    assert (smollm2_dir / "model.safetensors").stat().st_mtime == mtime
    # Cleaning happens on the next real preparation; a prepared dir returns before touching it.
    stale.rmdir()


@pytest.mark.slow
def test_interrupted_preparation_leaves_no_model_and_recovers(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / ".SmolLM2-135M-Instruct.tmp-dead").mkdir()  # an earlier run was killed
    target = default_model_dir(models_dir)
    env = {**os.environ, "PREFLOOP_HOME": str(tmp_path)}
    code = "from service.cli import main; raise SystemExit(main(['model', 'prepare']))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    # Kill it mid-way: once it is de-quantising (a temp dir exists), or after 10 s.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(list(models_dir.glob(".*tmp-*"))) < 2:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert not is_prepared(target), "an interrupted run must not leave a model that looks ready"
    # The next run starts over cleanly and leaves only the finished model.
    assert prepare_default_model(models_dir, progress=False) == target
    assert is_prepared(target)
    assert [p.name for p in models_dir.iterdir() if p.suffix != ".lock"] == [target.name]


@pytest.mark.slow
def test_preparers_starting_together_both_get_the_model(tmp_path: Path) -> None:
    """Two replicas (or a test run and a benchmark) on one volume: one converts, the other
    waits for it. Before the lock, the second removed the first's work as "stale"."""
    env = {**os.environ, "PREFLOOP_HOME": str(tmp_path)}
    code = "from service.cli import main; raise SystemExit(main(['model', 'prepare']))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    target = default_model_dir(tmp_path.resolve() / "models")
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == str(target)
    assert is_prepared(target)
    names = [p.name for p in target.parent.iterdir() if p.suffix != ".lock"]
    assert names == [target.name]


@pytest.mark.slow
def test_cli_prepare_prints_the_model_dir() -> None:
    env = {**os.environ, "PREFLOOP_HOME": str(TEST_HOME)}
    out = subprocess.run(
        [sys.executable, "-m", "service", "model", "prepare"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(default_model_dir(TEST_HOME.resolve() / "models"))
