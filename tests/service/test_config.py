from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.config import Settings


def test_defaults_serve_smollm2_from_sqlite_under_home(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    assert s.host == "127.0.0.1" and s.port == 8000 and s.engine == "local"
    assert s.uses_default_model and s.model_name == "SmolLM2-135M-Instruct"
    assert s.db_url == f"sqlite:///{tmp_path / 'prefloop.db'}"
    assert s.models_dir == tmp_path / "models"


def test_rehearsal_prompts_are_the_operators_else_the_trainers(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).rehearsal_file is None  # the trainer's own set
    (tmp_path / "rehearsal.jsonl").write_text('{"prompt": "What is a noun?"}\n')
    assert Settings(home=tmp_path).rehearsal_file == tmp_path / "rehearsal.jsonl"
    other = tmp_path / "elsewhere.jsonl"
    assert Settings(home=tmp_path, rehearsal_path=str(other)).rehearsal_file == other


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFLOOP_PORT", "9001")
    monkeypatch.setenv("PREFLOOP_MODEL", str(tmp_path / "my-model"))
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("PREFLOOP_LORA_ADAPTERS", '{"friendly": "/adapters/friendly"}')
    s = Settings()
    assert s.port == 9001
    assert s.model_name == "my-model" and not s.uses_default_model
    assert s.db_url == "postgresql+psycopg://u@h/db"
    assert s.lora_adapters == {"friendly": "/adapters/friendly"}


def test_inconsistent_limits_are_refused() -> None:
    with pytest.raises(ValidationError, match="default_max_tokens"):
        Settings(default_max_tokens=2048, max_tokens_limit=1024)
    with pytest.raises(ValidationError):
        Settings(engine="tgi")


def test_gate_thresholds_per_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFLOOP_GATE__MAX_KL", "0.5")
    monkeypatch.setenv("PREFLOOP_GATE_SEGMENTS", '{"support": {"max_kl": 2.0}}')
    s = Settings()
    assert s.gate_for("support").max_kl == 2.0
    assert s.gate_for("default").max_kl == 0.5  # the fleet-wide setting
    assert s.gate_for("support").golden_tolerance == s.gate.golden_tolerance
    with pytest.raises(ValidationError, match=r"unknown thresholds \['max_kll'\]"):
        Settings(gate_segments={"support": {"max_kll": 2.0}})
