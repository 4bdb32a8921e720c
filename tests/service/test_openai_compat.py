"""What a new user's `openai` SDK and curl expect of the API (issue #22), on the embedded engine:
`prefloop serve` on the real SmolLM2 under uvicorn, raw httpx requests and the SDK.

JSON bodies without a JSON content type, `GET /v1/models/{id}`, `logprobs`/`top_logprobs`, and
the clear refusal of `tools` (they need the vLLM engine; see test_engine_vllm.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import TEST_HOME, make_adapter
from tests.servers import Server, serve_subprocess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ADAPTER = "team/pirate"  # a model id with a `/`: GET /v1/models/{id} takes it whole


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("openai-compat")
    adapter = make_adapter(smollm2_dir, tmp / "adapter", seed=1)
    env = {
        "PREFLOOP_HOME": str(TEST_HOME),
        "PREFLOOP_LORA_ADAPTERS": json.dumps({ADAPTER: str(adapter)}),
    }
    with serve_subprocess(env, tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


# --- JSON without a JSON content type --------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "text/plain", "text/plain; charset=utf-8"],
)
def test_a_json_body_is_read_whatever_its_content_type(server: Server, content_type: str) -> None:
    body = json.dumps({"messages": FRANCE, "max_tokens": 3, "temperature": 0}).encode()
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", content=body, headers=headers, timeout=60
    )
    assert r.request.headers.get("content-type") == content_type  # what curl -d sends
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    # Every JSON route, not just chat: the feedback route reads the body and looks the id up.
    r = httpx.post(
        f"{server.base_url}/v1/feedback",
        content=json.dumps({"completion_id": "chatcmpl-nope", "rating": 1}).encode(),
        headers=headers,
    )
    assert r.status_code == 404, r.text


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_a_400_that_says_to_send_json(
    server: Server, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", content=b"messages=hello", headers=headers
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"]
    assert "content-type: application/json" in error["message"]


def test_multipart_uploads_still_work(server: Server) -> None:
    adapter = server.log_path.parent / "adapter"
    r = httpx.post(
        f"{server.base_url}/v1/operator/adapters/upload",
        files={
            "config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
            "weights": (
                "adapter_model.safetensors",
                (adapter / "adapter_model.safetensors").read_bytes(),
            ),
        },
        data={"segment": "default", "reason": "multipart, not JSON"},
        headers={"X-Operator": "ops"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "candidate"


# --- GET /v1/models/{id} -----------------------------------------------------------------------
def test_models_retrieve_with_the_sdk(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list().data}
    assert {MODEL, ADAPTER} <= set(listed)
    base = client.models.retrieve(MODEL)
    assert base.id == MODEL and base.object == "model" and base.owned_by == "prefloop"
    adapter = client.models.retrieve(ADAPTER)
    assert adapter.id == ADAPTER
    assert adapter.model_dump()["parent"] == MODEL == listed[ADAPTER].model_dump()["parent"]
    for unknown in ("gpt-17", "team/nope@v1"):
        with pytest.raises(openai.NotFoundError, match=unknown):
            client.models.retrieve(unknown)


def test_an_unknown_model_is_an_openai_style_404(server: Server) -> None:
    r = httpx.get(f"{server.base_url}/v1/models/default@v9/x")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "default@v9/x" in error["message"]


# --- logprobs ----------------------------------------------------------------------------------
def check_logprobs(entries: list, k: int) -> None:
    for e in entries:
        assert e.logprob <= 0
        assert e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == k
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert sum(math.exp(lp) for lp in tops) <= 1 + 1e-5


def test_logprobs_of_a_greedy_answer(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = r.choices[0]
    entries = choice.logprobs.content
    assert "Paris" in choice.message.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    check_logprobs(entries, 5)
    for e in entries:  # greedy: the sampled token is the most likely one, at its log-prob
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)

    # Streamed: the same tokens and values, each with the text it makes up.
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=12, temperature=0, logprobs=True,
        top_logprobs=5, stream=True,
    )  # fmt: skip
    streamed, text = [], ""
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            streamed += c.logprobs.content if c.logprobs else []
    assert text == choice.message.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in entries
    ]


def test_logprobs_of_a_sampled_answer_with_penalties(client: openai.OpenAI) -> None:
    # The model's own distribution (before temperature and penalties), as vLLM reports by
    # default: the sampled token is no more likely than the top-1.
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=10, temperature=1.5, seed=7,
        presence_penalty=1.0, logprobs=True, n=2,
    )  # fmt: skip
    for choice in r.choices:
        entries = choice.logprobs.content
        assert entries and all(e.top_logprobs == [] and e.logprob <= 0 for e in entries)
    without = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2)
    assert without.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ],
)
def test_bad_logprobs_requests_are_400s(server: Server, body: dict, param: str) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"messages": FRANCE, **body}, timeout=60
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# --- tools -------------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALLED = [
    *FRANCE,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },  # fmt: skip
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.mark.parametrize(
    "body",
    [{"messages": FRANCE, "tools": [WEATHER]}, {"messages": CALLED}],
    ids=["tools", "tool-messages"],
)
def test_tools_need_the_vllm_engine(client: openai.OpenAI, body: dict) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, **body)
    error = raised.value.body
    assert error["param"] == "tools"
    assert "PREFLOOP_ENGINE=vllm" in error["message"]
