"""An adapter written by the trainer loads unchanged into the embedded engine and is served by
name through the real HTTP API."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.core.config import Settings
from service.main import create_app
from tests.servers import serve_thread
from trainer.dpo import TrainConfig, train

# Trains an adapter, then serves it.
pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def test_trainer_output_serves_through_the_gateway(
    tiny_llama_dir: Path, tmp_path: Path, db_url: str
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question number {i}?"}],
            "chosen": [{"role": "assistant", "content": "Short and kind answer."}],
            "rejected": [{"role": "assistant", "content": f"A rambling reply, take {i}."}],
        }
        for i in range(16)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = tmp_path / "adapters" / "v1"
    # A large learning rate so the tiny model's greedy output visibly moves.
    cfg = TrainConfig(lr=5e-2, epochs=2, batch_size=4, max_length=64, eval_fraction=0.0,
                      checkpoint_every=0)  # fmt: skip
    train(cfg, pairs=pairs, base=tiny_llama_dir, out=adapter, progress_bar=False)
    assert (adapter / "adapter_model.safetensors").is_file()
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["config"]["lr"] == 5e-2

    settings = Settings(
        home=tmp_path,
        model=str(tiny_llama_dir),
        served_model_name="tiny",
        database_url=db_url,
        lora_adapters={"v1": str(adapter)},
    )
    with serve_thread(create_app(settings)) as base_url:
        models = [m["id"] for m in httpx.get(f"{base_url}/v1/models").json()["data"]]
        assert models == ["tiny", "v1"]

        def answer(model: str) -> dict:
            r = httpx.post(
                f"{base_url}/v1/chat/completions",
                json={"model": model, "messages": HELLO, "max_tokens": 12, "temperature": 0},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            return r.json()

        base, tuned = answer("tiny"), answer("v1")
        assert tuned["adapter_version"] == "v1" and base["adapter_version"] is None
        assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
