"""`/metrics` after real traffic (counters move, database gauges say what is stored), request ids
in and out, and JSON log lines from a real `prefloop serve`."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.registry import APPROVED, Registry
from service.core.config import Settings
from service.storage.db import make_engine
from service.storage.tables import TrainingRun, utcnow
from tests.conftest import BOTH_DATABASES, make_adapter
from tests.servers import serve_subprocess
from tests.service.conftest import Live


def scrape(
    http: httpx.Client, headers: dict[str, str] | None = None
) -> dict[tuple[str, frozenset], float]:
    r = http.get("/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"metrics_cache_seconds": 0.0}  # every scrape reads the database afresh


@BOTH_DATABASES
def test_metrics_move_with_traffic(live: Live, tmp_path: Path) -> None:
    before = scrape(live.http)
    chat = "/v1/chat/completions"
    answer = live.chat([{"role": "user", "content": "Hi"}], n=2, user="ann")
    with live.http.stream(
        "POST", chat, json={"messages": [{"role": "user", "content": "Yo"}], "stream": True,
                            "max_tokens": 4},
    ) as r:  # fmt: skip
        assert r.status_code == 200 and r.read()
    assert live.http.post(chat, json={"model": "nope", "messages": []}).status_code in (400, 404)
    for user, rating in (("ann", 1), ("bob", -1)):
        r = live.feedback(completion_id=answer["id"], rating=rating, user=user)
        assert r.status_code == 201, r.text
    r = live.feedback(completion_id=answer["id"], type="pick", chosen_index=1, user="cy")
    assert r.status_code == 201, r.text
    live.compile()

    # What a refresh leaves in the database: a finished run, a gated and promoted version.
    db = make_engine(Settings(database_url=live.db_url))
    registry = Registry(db, tmp_path / "adapters")
    version = registry.register(make_adapter(live.model_dir, tmp_path / "a1", seed=1), actor="t")
    registry.record_eval(version.id, {"pairs": {}}, {"approved": True, "reasons": []})
    registry.transition(version.id, APPROVED, actor="t")
    registry.promote(version.id, actor="t")
    # Approved by hand (POST /adapters/{id}/approve): no gate verdict, which the gauges skip.
    by_hand = registry.register(make_adapter(live.model_dir, tmp_path / "a2", seed=2), actor="t")
    registry.transition(by_hand.id, APPROVED, actor="t")
    from sqlmodel import Session

    with Session(db) as s:
        now = utcnow()
        s.add(TrainingRun(status="succeeded", started_at=now - timedelta(seconds=42),
                          finished_at=now))  # fmt: skip
        s.commit()
    db.dispose()

    after = scrape(live.http)
    moved = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert moved("prefloop_http_requests_total", method="POST", route=chat, status="200") == 2
    assert moved("prefloop_http_requests_total", method="POST", route="/v1/feedback",
                 status="201") == 3  # fmt: skip
    assert moved("prefloop_generations_total", model="tiny", adapter_version="base",
                 status="succeeded") == 2  # fmt: skip
    assert moved("prefloop_tokens_total", model="tiny", adapter_version="base", kind="completion")
    assert moved("prefloop_tokens_total", model="tiny", adapter_version="base", kind="prompt")
    assert moved("prefloop_generation_duration_seconds_count", model="tiny",
                 adapter_version="base") == 2  # fmt: skip
    assert value(after, "prefloop_generations_in_progress") == 0
    assert moved("prefloop_feedback_events_total", kind="thumbs") == 2
    assert moved("prefloop_feedback_events_total", kind="pick") == 1

    assert value(after, "prefloop_db_metrics_up") == 1
    assert value(after, "prefloop_pairs", segment="default", status="approved") >= 1
    assert value(after, "prefloop_refresh_runs_total", segment="default", status="succeeded") == 1
    assert value(after, "prefloop_refresh_duration_seconds_count", segment="default") == 1
    assert abs(value(after, "prefloop_refresh_duration_seconds_sum", segment="default") - 42) < 1
    assert value(after, "prefloop_gate_verdicts_total", segment="default", verdict="approved") == 1
    assert value(after, "prefloop_active_adapter_version", segment="default",
                 version="default@v1") == 1  # fmt: skip
    assert value(after, "prefloop_thumbs_up_ratio", adapter_version="base") == 0.5
    assert value(after, "prefloop_thumbs_total", adapter_version="base", vote="down") == 1


def test_request_ids_in_and_out(live: Live) -> None:
    r = live.http.get("/healthz", headers={"X-Request-ID": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    generated = live.http.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != "trace-123"
    # An id that would break a log line (or a header) is replaced, not echoed.
    odd = live.http.get("/healthz", headers={"X-Request-ID": "a b\tc"}).headers["x-request-id"]
    assert odd != "a b\tc" and len(odd) == 32


def test_json_logs_carry_the_request_id(tiny_llama_dir: Path, tmp_path: Path) -> None:
    env = {
        "PREFLOOP_MODEL": str(tiny_llama_dir),
        "PREFLOOP_HOME": str(tmp_path),
        "PREFLOOP_REFRESH_ENABLED": "false",
        "PREFLOOP_LOG_JSON": "true",
    }
    with serve_subprocess(env, tmp_path) as server:
        r = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                  "some_new_field": 1},  # logged (a warning) inside the request
            headers={"X-Request-ID": "trace-abc"},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-abc"
        assert "prefloop_http_requests_total" in httpx.get(f"{server.base_url}/metrics").text
        log_text = server.log()
    lines = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message", "request_id"} <= set(lines[0])
    mine = [x for x in lines if x["request_id"] == "trace-abc"]
    assert any("some_new_field" in x["message"] for x in mine), mine
    assert any(x["logger"] == "uvicorn.access" for x in mine), "the access log line too"


@pytest.mark.slow
def test_the_scheduler_runs_quietly_at_info(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """APScheduler's "Running job ... executed successfully" at every threshold check (each
    minute by default) stays out of the default log; the check itself still runs."""
    env = {
        "PREFLOOP_MODEL": str(tiny_llama_dir),
        "PREFLOOP_HOME": str(tmp_path),
        "PREFLOOP_REFRESH_CHECK_SECONDS": "1",
    }
    with serve_subprocess(env, tmp_path) as server:
        url = f"{server.base_url}/v1/operator/schedule"
        first = httpx.get(url).json()["jobs"]
        deadline = time.monotonic() + 30
        runs = 0  # the jobs' next run times move each time one has run
        while runs < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            now = httpx.get(url).json()["jobs"]
            runs += now != first
            first = now
        assert runs >= 2, "the threshold check never ran"
        log_text = server.log()
    assert "service.engines.startup: ready" in log_text
    assert "apscheduler" not in log_text, log_text[-2000:]
