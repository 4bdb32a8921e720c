"""The chat API end to end: `prefloop serve` on the real SmolLM2, real HTTP, the official
`openai` SDK as the client, and the SQLite file it writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, func
from sqlmodel import Session, select

from service.storage.tables import Completion, Conversation, Message
from tests.conftest import TEST_HOME
from tests.servers import Server, serve_subprocess

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Server]:
    # No PREFLOOP_MODEL: the default model, found prepared under PREFLOOP_HOME.
    env = {"PREFLOOP_HOME": str(TEST_HOME), "PREFLOOP_MAX_TOKENS_LIMIT": "512"}
    with serve_subprocess(env, tmp_path_factory.mktemp("chat-api")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def db(server: Server) -> Iterator[Session]:
    engine = create_engine(server.db_url)
    yield Session(engine)
    engine.dispose()


def rows(db: Session, model: type) -> int:
    db.expire_all()
    return db.exec(select(func.count()).select_from(model)).one()


def test_models_lists_the_base_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct"]


def test_health_and_readiness(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base_url}/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == "SmolLM2-135M-Instruct"


def test_answers_paris_and_stores_the_exchange(client: openai.OpenAI, db: Session) -> None:
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, max_tokens=30
    )
    answer = resp.choices[0].message.content
    assert "Paris" in answer
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    db.expire_all()
    completion = db.get(Completion, resp.id)
    assert completion is not None, "the response id must name the stored completion"
    assert completion.status == "succeeded"
    assert completion.model == "SmolLM2-135M-Instruct" and completion.adapter_version is None
    assert completion.params["temperature"] == 0 and completion.params["max_tokens"] == 30
    assert completion.prompt_tokens == resp.usage.prompt_tokens
    assert completion.completion_tokens == resp.usage.completion_tokens
    assert completion.latency_ms > 0 and completion.finished_at is not None
    assert completion.conversation_id == resp.model_extra["conversation_id"]

    msgs = db.exec(
        select(Message).where(Message.conversation_id == completion.conversation_id)
    ).all()
    by_role = {m.role: m for m in msgs}
    assert set(by_role) == {"user", "assistant"}
    assert by_role["user"].content == FRANCE[0]["content"]
    assistant = by_role["assistant"]
    assert assistant.content == answer and assistant.parent_id == by_role["user"].id
    assert assistant.completion_id == resp.id and assistant.choice_index == 0
    assert assistant.id == resp.choices[0].model_extra["message_id"]


@pytest.mark.parametrize(
    "prompt",
    [
        "What is the capital of France?",
        "Write one sentence about the sea.",
        "List three colours, comma separated.",
    ],
)
def test_stream_and_non_stream_give_the_same_text(client: openai.OpenAI, prompt: str) -> None:
    messages = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=40
    )
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2, (
        "streaming must deliver the answer in several chunks, token by token"
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streamed_answer_is_stored(client: openai.OpenAI, db: Session) -> None:
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    db.expire_all()
    completion = db.get(Completion, chunks[0].id)
    assert completion.status == "succeeded" and completion.stream
    (answer,) = db.exec(select(Message).where(Message.completion_id == chunks[0].id)).all()
    assert answer.content == text and answer.finish_reason == "stop"
    assert answer.id == chunks[0].choices[0].model_extra["message_id"]


def test_conversation_continues_from_the_stored_history(client: openai.OpenAI, db: Session) -> None:
    first = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "My name is Ada. Say hello to me."}],
        temperature=0,
        max_tokens=30,
    )
    conv = first.model_extra["conversation_id"]
    # Only the new message: the server supplies the history.
    second = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is my name?"}],
        temperature=0,
        max_tokens=30,
        extra_body={
            "conversation_id": conv,
            "parent_id": first.choices[0].model_extra["message_id"],
        },
    )
    assert second.model_extra["conversation_id"] == conv
    # The model saw the stored history: same answer as sending it all explicitly.
    explicit = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[
            {"role": "user", "content": "My name is Ada. Say hello to me."},
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "What is my name?"},
        ],
        temperature=0,
        max_tokens=30,
    )
    assert second.choices[0].message.content == explicit.choices[0].message.content
    assert explicit.model_extra["conversation_id"] != conv
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens

    # The whole history resent, OpenAI style: stored once, not twice.
    history = [
        {"role": "user", "content": "My name is Ada. Say hello to me."},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": second.choices[0].message.content},
        {"role": "user", "content": "Thank you."},
    ]
    third = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=history,
        temperature=0,
        max_tokens=20,
        extra_body={"conversation_id": conv},
    )
    db.expire_all()
    msgs = db.exec(select(Message).where(Message.conversation_id == conv)).all()
    assert [m.role for m in msgs].count("user") == 3
    # The stored tree is one path: each message's parent is the one before it.
    leaf = next(m for m in msgs if m.completion_id == third.id)
    by_id = {m.id: m for m in msgs}
    path = []
    while leaf is not None:
        path.append(leaf)
        leaf = by_id.get(leaf.parent_id)
    assert [m.content for m in reversed(path)][:-1] == [h["content"] for h in history]


def test_n_choices_are_sibling_answers_and_seed_reproduces(
    client: openai.OpenAI, db: Session
) -> None:
    kwargs = dict(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Tell me a fun fact about cats."}],
        temperature=1.0,
        max_tokens=30,
        n=2,
        seed=1234,
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    db.expire_all()
    answers = db.exec(select(Message).where(Message.completion_id == a.id)).all()
    assert sorted(m.choice_index for m in answers) == [0, 1]
    assert len({m.parent_id for m in answers}) == 1, "choices are siblings under one prompt"


def test_max_tokens_and_stop(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, max_tokens=3
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3
    stopped = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, stop=["Paris"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == "The capital of France is "


def test_unknown_request_fields_are_accepted(server: Server) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"messages": FRANCE, "max_tokens": 5, "some_future_field": {"x": 1}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert "some_future_field" in server.log()


BAD_REQUESTS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({"messages": FRANCE, "max_tokens": 100_000}, 400, "max_tokens"),
    ({"messages": FRANCE, "max_completion_tokens": 100_000}, 400, "max_completion_tokens"),
    ({"messages": FRANCE, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": FRANCE, "temperature": 3}, 400, "temperature"),
    ({"messages": FRANCE, "n": 50}, 400, "n"),
    ({"messages": FRANCE, "stop": [""]}, 400, "stop"),
    ({"messages": FRANCE, "stop": ["x" * 257]}, 400, "stop"),
    ({"messages": FRANCE, "top_logprobs": 2}, 400, "top_logprobs"),  # needs logprobs: true
    # The embedded engine: tools need vLLM.
    (
        {"messages": FRANCE, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
    ),
    ({"messages": FRANCE, "model": "gpt-17"}, 404, "model"),
    ({"messages": FRANCE, "conversation_id": "conv-nope"}, 404, "conversation_id"),
    ({"messages": FRANCE, "parent_id": "msg-nope"}, 400, "parent_id"),
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, 400, "messages.0.content"),
    ({"messages": "hello"}, 400, "messages"),
    # SmolLM2's vocabulary is 49152 tokens: an id past it never reaches the shared batch.
    ({"messages": FRANCE, "logit_bias": {"49152": 5}}, 400, "logit_bias"),
    ({"messages": FRANCE, "logit_bias": {"-1": 5}}, 400, "logit_bias"),
    ({"messages": FRANCE, "logit_bias": {"\u0661": 5}}, 400, "logit_bias"),
    ({"messages": FRANCE, "logit_bias": {"1": 101}}, 400, "logit_bias.1"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_store_nothing(
    server: Server, db: Session, body: dict, status: int, param: str
) -> None:
    before = (rows(db, Conversation), rows(db, Message), rows(db, Completion))
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert len(error["message"]) > 10
    assert (rows(db, Conversation), rows(db, Message), rows(db, Completion)) == before


def test_a_bad_request_does_not_hurt_one_being_generated(server: Server) -> None:
    body = {"messages": FRANCE, "max_tokens": 24, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as streaming:
            lines = streaming.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            bad = http.post("/v1/chat/completions", json={**body, "stream": False,
                            "logit_bias": {"999999999": 100}})  # fmt: skip
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
            assert "data: [DONE]" in list(lines)
        assert streaming.status_code == 200


def test_invalid_json_is_a_400(server: Server) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="gpt-17"):
        client.chat.completions.create(model="gpt-17", messages=FRANCE)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=FRANCE, max_tokens=10_000
        )
