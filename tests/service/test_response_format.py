"""`response_format` on the embedded engine and the real SmolLM2: JSON answers that parse and
validate against their schema, constrained and free rows decoding in one running batch,
streaming, regeneration, and clear 400s for bad formats over real HTTP. (The vLLM engine's case
is in test_engine_vllm.py, on its real server.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from service.core.config import Settings
from service.engines.base import GenerationRequest, SamplingParams
from service.engines.local import LocalEngine
from service.main import create_app
from tests.servers import serve_thread
from tests.service.test_engine_local import _batched, _staggered, collect, text_of

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "Give me the capital of France as JSON."}]
CITY = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
}
# Every document this schema allows is short: sampled choices always finish.
PICK = {
    "type": "object",
    "properties": {"capital": {"enum": ["Paris", "Lyon", "Nice"]}},
    "required": ["capital"],
}


def schema_format(schema: dict[str, Any], name: str = "city") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Iterator[LocalEngine]:
    engine = LocalEngine(str(smollm2_dir), model_name="smol")
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.aclose())


@dataclass
class Gateway:
    http: httpx.Client

    def chat(self, **body: Any) -> httpx.Response:
        payload = {"messages": CAPITAL, "max_tokens": 40, "temperature": 0, **body}
        return self.http.post("/v1/chat/completions", json=payload)


@pytest.fixture(scope="module")
def gateway(
    smol: LocalEngine, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("response-format")
    settings = Settings(
        home=tmp,
        model=str(smollm2_dir),
        database_url=f"sqlite:///{tmp / 'p.db'}",
        refresh_enabled=False,
    )
    with serve_thread(create_app(settings, engine=smol)) as url:
        with httpx.Client(base_url=url, timeout=300) as http:
            yield Gateway(http)


def test_json_object_answer_parses(gateway: Gateway) -> None:
    free = gateway.chat().json()["choices"][0]
    assert not free["message"]["content"].startswith("{")  # unconstrained, it answers in prose
    r = gateway.chat(response_format={"type": "json_object"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    # "text" is no constraint: the prose answer again.
    text = gateway.chat(response_format={"type": "text"}).json()["choices"][0]
    assert text["message"]["content"] == free["message"]["content"]


def test_json_schema_answer_streams_and_validates(gateway: Gateway) -> None:
    body = {"messages": CAPITAL, "max_tokens": 40, "temperature": 0, "stream": True,
            "response_format": schema_format(CITY)}  # fmt: skip
    with gateway.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([d for d in deltas if d]) > 3  # streamed token by token, not in one piece
    text = "".join(d for d in deltas if d)
    jsonschema.validate(json.loads(text), CITY)
    assert [c["choices"][0].get("finish_reason") for c in chunks][-1] == "stop"
    # Stored as streamed.
    stored = gateway.http.get(f"/v1/chat/completions/{chunks[0]['id']}").json()
    assert stored["choices"][0]["message"]["content"] == text


def test_max_tokens_cuts_the_json_with_finish_length(gateway: Gateway) -> None:
    r = gateway.chat(max_tokens=3, response_format=schema_format(CITY))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == '{"country'  # cut mid-document


def test_a_regeneration_keeps_the_format(gateway: Gateway) -> None:
    first = gateway.chat(response_format={"type": "json_object"}).json()
    again = gateway.chat(messages=[], regenerate=first["id"])  # a regenerate button: no format
    assert again.status_code == 200, again.text
    content = again.json()["choices"][0]["message"]["content"]
    assert content == first["choices"][0]["message"]["content"]  # greedy, same format
    assert isinstance(json.loads(content), dict)
    # A format given with the regeneration wins ("text": no constraint, the prose answer).
    prose = gateway.chat(messages=[], regenerate=first["id"], response_format={"type": "text"})
    assert (
        prose.json()["choices"][0]["message"]["content"]
        == gateway.chat().json()["choices"][0]["message"]["content"]
    )


@pytest.mark.parametrize(
    ("response_format", "param", "says"),
    [
        ({"type": "xml"}, "response_format", "json_object"),
        ("json", "response_format", "json_schema"),
        ({"type": "json_schema"}, "response_format.json_schema", "required"),
        ({"type": "json_schema", "json_schema": {"schema": CITY}},
         "response_format.json_schema.name", "required"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": CITY}},
         "response_format.json_schema.name", "pattern"),
        # Well-formed, but no schema the compiler can use.
        (schema_format({"type": "foo"}), "response_format", 'Unsupported type "foo"'),
        (schema_format({"$ref": "#/nowhere"}), "response_format", "nowhere"),
        (schema_format({"type": "string", "pattern": "(("}), "response_format", "egex"),
    ],
)  # fmt: skip
def test_a_bad_format_is_a_clear_400(
    gateway: Gateway, response_format: Any, param: str, says: str
) -> None:
    r = gateway.chat(response_format=response_format)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert says in error["message"], error
    assert ".cc:" not in error["message"]  # no C++ source locations for clients


def test_constrained_and_free_rows_share_a_running_batch(smol: LocalEngine) -> None:
    """Per-row matchers: a free row beside formatted ones answers exactly as alone (greedy),
    whether they start together or join the running batch one by one; each formatted choice
    (n=3, sampled) is its own valid document."""
    free = GenerationRequest(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=24, temperature=0),
    )
    city = GenerationRequest(
        CAPITAL, SamplingParams(max_tokens=40, temperature=0, response_format=schema_format(CITY))
    )
    picks = GenerationRequest(
        CAPITAL,
        SamplingParams(max_tokens=40, temperature=1.0, n=3, seed=5,
                       response_format=schema_format(PICK, "pick")),
    )  # fmt: skip
    requests = [free, city, picks]
    alone = [asyncio.run(collect(smol, r)) for r in requests]
    for arrive in (_batched, _staggered):
        together = asyncio.run(arrive(smol, requests))
        assert text_of(together[0][0]) == text_of(alone[0][0])
        assert "Paris" in text_of(together[0][0])
        assert text_of(together[1][0]) == text_of(alone[1][0])
        jsonschema.validate(json.loads(text_of(together[1][0])), CITY)
        assert together[1][0][-1].finish_reason == "stop"
        for i in range(3):
            jsonschema.validate(json.loads(text_of(together[2][i])), PICK)
            assert together[2][i][-1].finish_reason == "stop"
