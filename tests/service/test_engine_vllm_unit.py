"""The vLLM engine's handling of upstream failures that a healthy vLLM-CPU server cannot be made
to produce on demand (a 500, an error event mid-stream, a stream cut short after a clean
chunk), with httpx's MockTransport as the upstream; the real-server behaviour is in
test_engine_vllm.py. Plus the pure helpers: adapter names, thread binding, the URL setting."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from service.core.config import Settings
from service.core.errors import BadGatewayError, InvalidRequestError, UpstreamUnavailableError
from service.engines.base import GenerationRequest, SamplingParams
from service.engines.vllm import VLLMEngine, upstream_name
from service.engines.vllm_dev import thread_binds

MODELS = {"data": [{"id": "base", "parent": None, "max_model_len": 512}]}
HI = [{"role": "user", "content": "Hi"}]


def sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)


def chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def run(tiny_llama_dir: Path, chat_handler, *, stream: bool = True):
    """Start an engine whose one replica answers /v1/models and, for chat, `chat_handler`;
    return the deltas of one request, or the error it raised."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        return chat_handler(request)

    async def go():
        engine = VLLMEngine(
            ["http://vllm"],
            model_name="tiny",
            tokenizer_path=str(tiny_llama_dir),
            transport=httpx.MockTransport(handler),
            health_seconds=60,
        )
        await engine.start()
        try:
            req = GenerationRequest(HI, SamplingParams(max_tokens=4, temperature=0), stream=stream)
            stream_ = await engine.generate(req)
            return [d async for d in stream_], engine
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc, engine
        finally:
            await engine.aclose()

    return asyncio.run(go())


def test_deltas_finish_reasons_and_usage_are_relayed(tiny_llama_dir: Path) -> None:
    def chat(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["model"] == "base" and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        usage = {"prompt_tokens": 9, "completion_tokens": 1}
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=sse({**chunk("Hel"), "usage": usage},
                        {**chunk("lo", "stop"), "usage": {**usage, "completion_tokens": 2}})
            + b"data: [DONE]\n\n",
        )  # fmt: skip

    deltas, engine = run(tiny_llama_dir, chat)
    assert [(d.text, d.finish_reason, d.completion_tokens) for d in deltas] == [
        ("Hel", None, 1),
        ("lo", "stop", 2),
    ]
    assert engine.context_length() == 512


def test_each_delta_is_relayed_before_the_upstream_sends_the_next(tiny_llama_dir: Path) -> None:
    """Streaming by causality, not by timing: the upstream sends its second chunk only once the
    engine's caller holds the first. An engine that buffered the answer would wait forever (the
    upstream gives up after 30 s and the request fails)."""
    got_first = asyncio.Event()

    async def body():
        yield sse(chunk("one"))
        await asyncio.wait_for(got_first.wait(), 30)
        yield sse(chunk(" two", "stop")) + b"data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    async def go() -> list[str]:
        engine = VLLMEngine(["http://vllm"], model_name="tiny", tokenizer_path=str(tiny_llama_dir),
                            transport=httpx.MockTransport(handler), health_seconds=60)  # fmt: skip
        await engine.start()
        try:
            req = GenerationRequest(HI, SamplingParams(max_tokens=4, temperature=0), stream=True)
            texts = []
            async for delta in await engine.generate(req):
                texts.append(delta.text)
                if delta.text == "one":
                    got_first.set()
            return texts
        finally:
            await engine.aclose()

    assert asyncio.run(go()) == ["one", " two"]


def test_whole_answers_are_fetched_unstreamed(tiny_llama_dir: Path) -> None:
    def chat(request: httpx.Request) -> httpx.Response:
        assert "stream" not in json.loads(request.content)
        return httpx.Response(
            200,
            json={
                "choices": [
                    {"index": 0, "message": {"content": "Hello"}, "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4},
            },
        )

    deltas, _ = run(tiny_llama_dir, chat, stream=False)
    assert [(d.text, d.finish_reason, d.completion_tokens) for d in deltas] == [
        ("Hello", "length", 4)
    ]


@pytest.mark.parametrize(
    ("response", "error", "words"),
    [
        (httpx.Response(500, json={"error": {"message": "CUDA error"}}), BadGatewayError,
         "HTTP 500): CUDA error"),
        (httpx.Response(400, json={"error": {"message": "too long"}}), InvalidRequestError,
         "vLLM refused the request: too long"),
        (httpx.Response(503, text="busy"), UpstreamUnavailableError, "no vLLM replica can take"),
        (httpx.Response(200, headers={"content-type": "text/event-stream"},
                        content=sse(chunk("a"), {"error": {"message": "engine dead"}})),
         BadGatewayError, "failed: engine dead"),
        (httpx.Response(200, headers={"content-type": "text/event-stream"},
                        content=sse(chunk("a"))),
         BadGatewayError, "ended the stream before the answer was finished"),
        (httpx.Response(200, headers={"content-type": "text/event-stream"},
                        content=sse(chunk("a", "abort"))),
         BadGatewayError, "aborted the request"),
    ],
)  # fmt: skip
def test_upstream_failures_become_clear_errors(
    tiny_llama_dir: Path, response: httpx.Response, error: type, words: str
) -> None:
    result, _ = run(tiny_llama_dir, lambda _req: response)
    assert isinstance(result, error), result
    assert words in result.message
    assert result.status_code in (400, 502, 503)


def test_upstream_names_are_deterministic_and_one_to_one() -> None:
    assert upstream_name("default@v3") == "default@v3"
    assert upstream_name("sup port/x_1") == "sup_20port_2fx_5f1"
    names = ["a_b", "a b", "a_20b", "a-b", "a.b"]
    assert len({upstream_name(n) for n in names}) == len(names)


def test_replicas_share_the_cores_out() -> None:
    assert thread_binds(1, cores=2) == ["auto"]
    assert thread_binds(2, cores=2) == ["0", "1"]
    assert thread_binds(2, cores=8) == ["0-3", "4-7"]
    assert thread_binds(3, cores=2) == ["0", "1", "0"]


def test_vllm_urls_accept_commas_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFLOOP_VLLM_URLS", "http://a:8000/, http://b:8000")
    assert Settings().vllm_urls == ["http://a:8000", "http://b:8000"]
    monkeypatch.setenv("PREFLOOP_VLLM_URLS", '["http://c:1"]')
    assert Settings().vllm_urls == ["http://c:1"]
    monkeypatch.setenv("PREFLOOP_ENGINE", "vllm")
    assert Settings().engine == "vllm"
