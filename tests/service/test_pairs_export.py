"""`prefloop pairs export`: compiles new feedback with the server's settings, then writes TRL's
conversational DPO / KTO JSONL that `datasets` loads and TRL recognises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from datasets import load_dataset
from trl.data_utils import is_conversational

from tests.service.conftest import Live

ROOT = Path(__file__).resolve().parents[2]


def export(live: Live, tmp_path: Path, fmt: str, *extra: str) -> tuple[Path, str]:
    out = tmp_path / f"{fmt}.jsonl"
    env = {**os.environ, "PREFLOOP_DATABASE_URL": live.db_url, "PREFLOOP_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "service", "pairs", "export", "--format", fmt, "--out", str(out)]
        + list(extra),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_export_compiles_then_writes_trl_rows(live: Live, tmp_path: Path) -> None:
    first = live.chat([{"role": "user", "content": "Plan a picnic."}], user="ann")
    second = live.chat(
        [{"role": "user", "content": "Then what?"}], conversation_id=first["conversation_id"], n=2
    )
    live.feedback(completion_id=second["id"], type="pick", chosen_index=0)
    lone = live.chat([{"role": "user", "content": "Describe autumn leaves."}], user="bo")
    live.feedback(completion_id=lone["id"], rating=-1)

    out, stdout = export(live, tmp_path, "dpo")
    assert "compiled: 1 new pairs, 1 new KTO rows, 0 excluded" in stdout
    assert f"wrote 1 dpo rows (approved) to {out}" in stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == [
        {"role": "user", "content": "Plan a picnic."},
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Then what?"},
    ]
    assert row["chosen"] == [
        {"role": "assistant", "content": second["choices"][0]["message"]["content"]}
    ]
    assert row["rejected"] == [
        {"role": "assistant", "content": second["choices"][1]["message"]["content"]}
    ]
    assert row["source"] == "pick" and row["status"] == "approved"
    dpo = load_dataset("json", data_files=str(out), split="train")
    assert len(dpo) == 1 and is_conversational(dpo[0])

    out, stdout = export(live, tmp_path, "kto")
    assert "compiled: 0 new pairs, 0 new KTO rows" in stdout, "nothing compiled twice"
    kto = load_dataset("json", data_files=str(out), split="train")
    assert len(kto) == 1 and is_conversational(kto[0])
    assert kto[0]["label"] is False
    assert kto[0]["completion"] == [
        {"role": "assistant", "content": lone["choices"][0]["message"]["content"]}
    ]

    # Excluded by an operator: gone from the default (approved) export.
    pair_id = live.http.get("/v1/operator/pairs", params={"kind": "pair"}).json()["data"][0]["id"]
    live.http.post(f"/v1/operator/pairs/{pair_id}/exclude")
    out, stdout = export(live, tmp_path, "dpo", "--no-compile")
    assert out.read_text() == "" and "wrote 0 dpo rows" in stdout
    out, _ = export(live, tmp_path, "dpo", "--no-compile", "--status", "excluded")
    assert len(out.read_text().splitlines()) == 1
