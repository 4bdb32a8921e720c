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


def test_a_fresh_install_gates_on_the_shipped_golden_set_and_operators_extend_or_replace_it(
    tmp_path: Path,
) -> None:
    import json

    from service.loop.datasets import canary_for, golden_for
    from trainer.golden import SHIPPED_GOLDEN, load_golden

    shipped = load_golden(SHIPPED_GOLDEN)
    assert len(shipped) == 113
    settings = Settings(home=tmp_path)
    assert [i.id for i in golden_for(settings, "default")] == [i.id for i in shipped]

    def item(id_: str, word: str) -> str:
        return json.dumps({"id": id_, "prompt": f"Say {word}.", "checks": {"contains": [word]}})

    # The operator's file adds items, and replaces a shipped one by its id; a segment's adds more.
    (tmp_path / "golden.jsonl").write_text(item(shipped[0].id, "hello") + "\n" + item("mine", "x"))
    (tmp_path / "golden").mkdir()
    (tmp_path / "golden" / "support.jsonl").write_text(item("support-only", "thanks") + "\n")
    default = {i.id: i for i in golden_for(settings, "default")}
    assert len(default) == 114 and default[shipped[0].id].checks.contains == ("hello",)
    support = {i.id for i in golden_for(settings, "support")}
    assert support == set(default) | {"support-only"}
    alone = Settings(home=tmp_path, golden_include_shipped=False)
    assert [i.id for i in golden_for(alone, "support")] == [shipped[0].id, "mine", "support-only"]

    # Canary prompts: the segment's file, else the operator's, else the shipped set (None).
    assert canary_for(settings, "support") is None
    (tmp_path / "canary.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert canary_for(settings, "support") == tmp_path / "canary.jsonl"
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "support.jsonl").write_text((tmp_path / "canary.jsonl").read_text())
    assert canary_for(settings, "support") == tmp_path / "canary" / "support.jsonl"
    assert canary_for(settings, "default") == tmp_path / "canary.jsonl"
