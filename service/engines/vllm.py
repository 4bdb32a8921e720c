"""The vLLM engine: prefloop as the gateway in front of one or more vLLM servers.

Each replica is a vLLM OpenAI-compatible server (``PREFLOOP_VLLM_URLS``). Requests go, over one
pooled async httpx client with timeouts, to the healthy replica with the fewest requests in
flight; the upstream SSE stream is relayed delta by delta, with vLLM's finish reasons and token
counts. Nothing is generated here.

Adapters are runtime LoRAs (``POST /v1/load_lora_adapter``, vLLM started with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True --enable-lora``). A version is loaded under its immutable
id (``default@v3``; see ``upstream_name``) on *every* live replica before ``load_adapter``
returns, so when the router flips the route every replica can serve it. A replica that was down
(or restarted: vLLM forgets runtime adapters) is compared with what it should have (its
``/v1/models`` against the loaded set) and reconciled *before* it gets traffic again.

Upstream failures, as the client sees them (OpenAI error bodies, the completion stored failed):

- no replica reachable, all asleep or overloaded: 503 with ``Retry-After``
  (connection failures and a replica that lost an adapter are retried on another replica first:
  nothing was generated yet);
- vLLM answered 4xx: 400 with vLLM's message (e.g. the prompt does not fit);
- vLLM answered 5xx, or the stream broke (a replica died mid-answer): 502;
- no answer within ``PREFLOOP_VLLM_READ_TIMEOUT_SECONDS``: 504.

Sleep mode (one GPU for serving and training): ``sleep()`` stops new requests here (503 with
``Retry-After``), then ``POST /sleep`` on every replica; ``wake()`` is ``POST /wake_up``. A fleet
put to sleep by another process (``prefloop worker``) is noticed through ``GET /is_sleeping``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from service.core.errors import (
    BadGatewayError,
    EngineError,
    EngineSleepingError,
    GatewayTimeoutError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    UpstreamUnavailableError,
)
from service.engines.base import ChoiceDelta, GenerationRequest, TokenLogprob

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[A-Za-z0-9.@-]")


def upstream_name(name: str) -> str:
    """The LoRA name used in vLLM for one of ours: characters outside ``[A-Za-z0-9.@-]`` become
    ``_xx`` (hex), ``_`` included, so the mapping is deterministic and one-to-one."""
    return "".join(c if _SAFE.fullmatch(c) else f"_{ord(c):02x}" for c in name)


@dataclass
class Replica:
    url: str
    state: str = "down"  # down | syncing | ready | sleeping
    inflight: int = 0
    served: int = 0  # requests it accepted
    loaded: set[str] = field(default_factory=set)  # upstream LoRA names it reported
    last_error: str | None = None


class VLLMStream:
    """One request's deltas, relayed from vLLM's SSE stream."""

    def __init__(
        self,
        engine: VLLMEngine,
        replica: Replica,
        response: httpx.Response,
        n: int,
    ):
        self._engine, self._replica, self._response = engine, replica, response
        self._n = n
        self.prompt_tokens = 0  # vLLM's count arrives with the first chunk
        self._closed = False

    def cancel(self) -> None:
        """Stop generating: closing the connection makes vLLM abort the request."""
        if not self._closed:
            self._closed = True
            self._replica.inflight -= 1
            with contextlib.suppress(RuntimeError):  # no running loop: nothing left to close
                asyncio.get_running_loop().create_task(self._response.aclose())

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        """vLLM's chunks; a whole (non-streamed) answer is one event, choices as deltas."""
        if self._response.headers.get("content-type", "").startswith("application/json"):
            body = json.loads(await self._response.aread())
            for choice in body.get("choices") or ():
                choice["delta"] = choice.pop("message", None) or {}
                # A whole answer's tool calls, as the one streamed piece of each call.
                calls = choice["delta"].get("tool_calls") or ()
                choice["delta"]["tool_calls"] = [{**c, "index": k} for k, c in enumerate(calls)]
            yield body
            return
        async for line in self._response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data != "[DONE]":  # read on to the body's end: the connection is then reused
                yield json.loads(data)

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        tokens = [0] * self._n
        finished = [False] * self._n
        url = self._replica.url
        try:
            async for chunk in self._events():
                if "error" in chunk:
                    raise BadGatewayError(f"vLLM at {url} failed: {_message(chunk)}")
                usage = chunk.get("usage")
                if usage:
                    self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
                for choice in chunk.get("choices") or ():
                    i = choice["index"]
                    # Streamed with continuous usage: this choice's tokens so far; a whole
                    # answer (always n=1, see VLLMEngine._payload): all of them.
                    if usage:
                        tokens[i] = max(tokens[i], usage.get("completion_tokens", 0))
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    finish = choice.get("finish_reason")
                    if finish == "abort":
                        raise BadGatewayError(f"vLLM at {url} aborted the request")
                    if finish is not None:
                        finished[i] = True
                    logprobs = _logprobs(choice.get("logprobs"))
                    calls = tuple(delta.get("tool_calls") or ())
                    if text or finish is not None or logprobs or calls:
                        yield ChoiceDelta(i, text, finish, tokens[i], logprobs, calls)
        except httpx.TimeoutException as exc:
            raise GatewayTimeoutError(
                f"vLLM at {url} sent nothing for {self._engine.read_timeout:.0f}s; "
                "retry, or raise PREFLOOP_VLLM_READ_TIMEOUT_SECONDS"
            ) from exc
        except ValueError as exc:  # not JSON
            raise BadGatewayError(f"vLLM at {url} sent a malformed answer: {exc}") from exc
        except httpx.HTTPError as exc:
            self._engine._suspect(self._replica, exc)
            raise BadGatewayError(
                f"the connection to vLLM at {url} broke mid-answer "
                f"({type(exc).__name__}); retry the request"
            ) from exc
        finally:
            self.cancel()
        if not all(finished):
            self._engine._suspect(self._replica, "stream ended early")
            raise BadGatewayError(
                f"vLLM at {url} ended the stream before the answer was finished; retry"
            )


class VLLMEngine:
    # Passed through; vLLM needs `--enable-auto-tool-choice --tool-call-parser ...` for
    # `tool_choice: "auto"` (named and "required" choices work without).
    supports_tools = True

    def __init__(
        self,
        urls: list[str],
        *,
        model_name: str,
        tokenizer_path: str,
        upstream_model: str = "",
        adapter_path_map: tuple[str, str] | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 120.0,
        max_connections: int = 256,
        max_queue: int = 256,
        health_seconds: float = 1.0,
        sleep_retry_after: int = 30,
        check_sleeping: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ):
        if not urls:
            raise ValueError("the vLLM engine needs at least one URL (PREFLOOP_VLLM_URLS)")
        self.model_name = model_name
        self.tokenizer_path = tokenizer_path
        self.upstream_model = upstream_model  # empty: what the replicas serve as their base
        self.adapter_path_map = adapter_path_map
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.max_queue = max_queue
        self.health_seconds = health_seconds
        self.sleep_retry_after = sleep_retry_after
        self.check_sleeping = check_sleeping
        self._transport = transport
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.tokenizer: Any = None
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client: httpx.AsyncClient | None = None
        self._adapters: dict[str, str] = {}  # our name -> path the replicas read it from
        self._fleet_lock = asyncio.Lock()  # adapter loads, unloads and reconciles, one at a time
        self._context = 2048
        self._asleep = False  # put to sleep through this engine (a refresh in this process)
        self._health_task: asyncio.Task | None = None
        self._rr = 0
        self._ready = False
        self.retries = 0  # requests sent to another replica after one could not take them
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.tokenizer_path)
        self.loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.read_timeout, connect=self.connect_timeout),
            limits=self._limits,
            transport=self._transport,
        )
        t0 = time.perf_counter()
        up = ("ready", "sleeping")  # a fleet asleep for a refresh is up: it wakes afterwards
        while not any(r.state in up for r in self.replicas):
            await self.check_replicas()
            if not any(r.state in up for r in self.replicas):
                if time.perf_counter() - t0 > 5:
                    log.info(
                        "waiting for a vLLM replica: %s",
                        "; ".join(f"{r.url}: {r.last_error}" for r in self.replicas),
                    )
                    t0 = time.perf_counter()
                await asyncio.sleep(0.5)
        self._health_task = asyncio.create_task(self._health_loop())
        self._ready = True
        log.info(
            "vLLM engine ready: %s serves %s (context %d)",
            ", ".join(r.url for r in self.replicas if r.state == "ready"),
            self.upstream_model,
            self._context,
        )

    async def aclose(self) -> None:
        self._ready = False
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def is_ready(self) -> bool:
        return self._ready and any(r.state in ("ready", "sleeping") for r in self.replicas)

    def context_length(self) -> int:
        return self._context

    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise NotReadyError("the tokenizer is still loading; retry shortly")
        return len(self.tokenizer)

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        if self.tokenizer is None:  # a request during start-up (chat counts before generating)
            raise NotReadyError("the tokenizer is still loading; retry shortly")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- replicas: health, restart detection, reconciliation ------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_seconds)
            try:
                await self.check_replicas()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad round must not end health checking
                log.exception("vLLM health check failed")

    async def check_replicas(self) -> None:
        await asyncio.gather(*(self._check(r) for r in self.replicas))

    async def _check(self, replica: Replica) -> None:
        """Ask the replica what it serves; reconcile its adapters before it gets traffic."""
        expected = list(self._adapters)
        try:
            r = await self._client.get(f"{replica.url}/v1/models", timeout=5.0)
            r.raise_for_status()
            cards = r.json()["data"]
            sleeping = False
            if self.check_sleeping:
                s = await self._client.get(f"{replica.url}/is_sleeping", timeout=5.0)
                sleeping = s.status_code == 200 and bool(s.json().get("is_sleeping"))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            if replica.state != "down":
                log.warning("vLLM replica %s is down: %s", replica.url, _describe(exc))
            replica.state, replica.last_error = "down", _describe(exc)
            return
        bases = [c for c in cards if not c.get("parent")]
        if not self.upstream_model and bases:
            self.upstream_model = bases[0]["id"]
        for c in bases:
            if c["id"] == self.upstream_model and c.get("max_model_len"):
                self._context = int(c["max_model_len"])
        replica.loaded = {c["id"] for c in cards if c.get("parent")}
        replica.last_error = None
        # Only names loaded fleet-wide before we asked count as missing (no race with a load).
        if {upstream_name(n) for n in expected} - replica.loaded:
            if not await self._reconcile(replica):
                return
        new = "sleeping" if sleeping else "ready"
        if replica.state != new:
            log.info("vLLM replica %s is %s", replica.url, new)
        replica.state = new

    async def _reconcile(self, replica: Replica) -> bool:
        """Load what the replica is missing (it restarted, or was down during a promotion).
        It gets no new requests until it has every adapter."""
        async with self._fleet_lock:
            missing = {
                n: p for n, p in self._adapters.items() if upstream_name(n) not in replica.loaded
            }
            if not missing:
                return True
            if replica.state == "ready":
                log.warning("vLLM replica %s lost adapters (restarted?); reloading", replica.url)
            replica.state = "syncing"
            try:
                for name, path in missing.items():
                    await self._load_on(replica, name, path)
                    replica.loaded.add(upstream_name(name))
            except (EngineError, httpx.HTTPError) as exc:
                replica.state, replica.last_error = "down", _describe(exc)
                log.warning("could not reconcile vLLM replica %s: %s", replica.url, exc)
                return False
        log.info("vLLM replica %s reconciled: %s", replica.url, sorted(missing))
        return True

    def _suspect(self, replica: Replica, why: object) -> None:
        """A request saw the replica fail: take it out of rotation until a check passes."""
        if replica.state == "ready":
            log.warning("vLLM replica %s failed a request (%s)", replica.url, _describe(why))
            replica.state, replica.last_error = "down", _describe(why)

    # --- adapters --------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _upstream_path(self, path: str) -> str:
        if self.adapter_path_map and path.startswith(self.adapter_path_map[0]):
            return self.adapter_path_map[1] + path[len(self.adapter_path_map[0]) :]
        return path

    async def _load_on(self, replica: Replica, name: str, path: str) -> None:
        body = {"lora_name": upstream_name(name), "lora_path": self._upstream_path(path)}
        r = await self._client.post(f"{replica.url}/v1/load_lora_adapter", json=body)
        if r.status_code == 400 and "already been loaded" in r.text:
            return  # another gateway loaded it: names are immutable versions, so it is ours
        if r.status_code != 200:
            raise EngineError(
                f"vLLM at {replica.url} could not load {name} from {body['lora_path']} "
                f"(HTTP {r.status_code}): {_message_text(r)}"
            )

    async def load_adapter(self, name: str, path: str) -> None:
        """Load on every live replica; return only when all of them have it."""
        if name == self.model_name:
            raise InvalidRequestError(f"adapter name {name!r} is reserved", param="name")
        async with self._fleet_lock:
            if name in self._adapters:
                raise InvalidRequestError(
                    f"adapter {name!r} is already loaded; versions are immutable, load a new name",
                    param="name",
                )
            live = [r for r in self.replicas if r.state != "down"]
            if not live:
                raise UpstreamUnavailableError("no vLLM replica is reachable to load an adapter")
            results = await asyncio.gather(
                *(self._load_on(r, name, path) for r in live), return_exceptions=True
            )
            failed = [(r, e) for r, e in zip(live, results, strict=True) if e is not None]
            if failed:
                # All or nothing: a version some replicas lack must not get the route.
                for r, e in zip(live, results, strict=True):
                    if e is None:
                        await self._unload_on(r, name)
                raise EngineError("; ".join(f"{r.url}: {_describe(e)}" for r, e in failed))
            for r in live:
                r.loaded.add(upstream_name(name))
            self._adapters[name] = path
        log.info("loaded %s on %d vLLM replica(s)", name, len(live))

    async def _unload_on(self, replica: Replica, name: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            r = await self._client.post(
                f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": upstream_name(name)}
            )
            if r.status_code not in (200, 404):  # 404: it is gone already (restarted)
                log.warning("vLLM at %s did not unload %s: %s", replica.url, name, r.text)
        replica.loaded.discard(upstream_name(name))

    async def unload_adapter(self, name: str) -> None:
        async with self._fleet_lock:
            if name not in self._adapters:
                raise NotFoundError(f"adapter {name!r} is not loaded")
            del self._adapters[name]  # first: a replica coming back must not get it again
            await asyncio.gather(
                *(self._unload_on(r, name) for r in self.replicas if r.state != "down")
            )

    # --- sleep mode (one GPU for serving and training) -----------------------------------------
    async def sleep(self, level: int = 1) -> None:
        """Stop sending requests, let running ones finish, then put every replica to sleep."""
        self._asleep = True
        deadline = time.perf_counter() + self.read_timeout
        while any(r.inflight for r in self.replicas) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(
            *(
                self._client.post(f"{r.url}/sleep", params={"level": level, "mode": "wait"})
                for r in self.replicas
                if r.state != "down"
            ),
            return_exceptions=True,
        )

    async def wake(self) -> None:
        await asyncio.gather(
            *(self._client.post(f"{r.url}/wake_up") for r in self.replicas if r.state != "down"),
            return_exceptions=True,
        )
        self._asleep = False
        await self.check_replicas()

    # --- generation ------------------------------------------------------------------------
    def _pick(self, tried: set[str]) -> Replica | None:
        ready = [r for r in self.replicas if r.state == "ready" and r.url not in tried]
        if not ready:
            return None
        least = min(r.inflight for r in ready)
        ready = [r for r in ready if r.inflight == least]
        self._rr += 1  # ties go round-robin
        return ready[self._rr % len(ready)]

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {
            "model": upstream_name(request.adapter) if request.adapter else self.upstream_model,
            "messages": request.messages,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "n": p.n,
        }
        # A client that waits for the whole answer gets it from vLLM in one piece: relaying a
        # stream costs the gateway ~0.3 ms of CPU per token (httpx), measured on 2 cores. With
        # n > 1 only a stream says how many tokens each choice took (usage is per choice).
        if request.stream or p.n > 1:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        if p.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
        if p.response_format:  # vLLM's structured outputs (xgrammar, guidance) honour it
            body["response_format"] = p.response_format
        if p.logprobs is not None:
            body["logprobs"], body["top_logprobs"] = True, p.logprobs
        if request.tools:
            body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        return body

    async def generate(self, request: GenerationRequest) -> VLLMStream:
        if not self._ready:
            raise NotReadyError("waiting for a vLLM replica to answer; retry shortly")
        if self._asleep:
            raise self._unavailable()
        if request.adapter is not None and request.adapter not in self._adapters:
            raise NotFoundError(f"adapter {request.adapter!r} is not loaded")
        if sum(r.inflight for r in self.replicas) >= self.max_queue:
            raise OverloadedError(
                f"{self.max_queue} requests are already running on vLLM; retry shortly"
            )
        body = self._payload(request)
        tried: set[str] = set()
        while True:
            replica = self._pick(tried)
            if replica is None:
                raise self._unavailable()
            tried.add(replica.url)
            replica.inflight += 1
            try:
                response = await self._send(replica, body)
            except _TryAnother:
                replica.inflight -= 1
                self.retries += 1
                continue
            except BaseException:
                replica.inflight -= 1
                raise
            replica.served += 1
            return VLLMStream(self, replica, response, request.params.n)

    async def _send(self, replica: Replica, body: dict[str, Any]) -> httpx.Response:
        """Send and read the status; raise _TryAnother where another replica may succeed."""
        req = self._client.build_request(
            "POST",
            f"{replica.url}/v1/chat/completions",
            json=body,
            timeout=httpx.Timeout(self.read_timeout, connect=self.connect_timeout),
        )
        try:
            response = await self._client.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            self._suspect(replica, exc)  # nothing was generated: safe to try elsewhere
            raise _TryAnother from exc
        except httpx.TimeoutException as exc:
            raise GatewayTimeoutError(
                f"vLLM at {replica.url} sent nothing for {self.read_timeout:.0f}s; retry, "
                "or raise PREFLOOP_VLLM_READ_TIMEOUT_SECONDS"
            ) from exc
        except httpx.HTTPError as exc:
            self._suspect(replica, exc)
            raise BadGatewayError(f"vLLM at {replica.url} failed: {_describe(exc)}") from exc
        if response.status_code == 200:
            return response
        await response.aread()
        await response.aclose()
        message = _message_text(response)
        if response.status_code == 404 and body["model"] != self.upstream_model:
            # The replica lost the adapter (it restarted): reconcile it, serve this elsewhere.
            self._suspect(replica, f"adapter {body['model']} missing")
            raise _TryAnother
        if response.status_code == 503:
            raise _TryAnother
        if 400 <= response.status_code < 500:
            raise InvalidRequestError(f"vLLM refused the request: {message}")
        raise BadGatewayError(
            f"vLLM at {replica.url} failed (HTTP {response.status_code}): {message}"
        )

    def _unavailable(self) -> OverloadedError:
        if self._asleep or (
            self.replicas
            and all(r.state in ("sleeping", "down") for r in self.replicas)
            and any(r.state == "sleeping" for r in self.replicas)
        ):
            return EngineSleepingError(
                "the model is paused while an adapter trains on its GPU; retry later",
                retry_after_s=self.sleep_retry_after,
            )
        states = ", ".join(f"{r.url} {r.state}" for r in self.replicas)
        return UpstreamUnavailableError(f"no vLLM replica can take the request ({states}); retry")


def _logprobs(logprobs: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    """vLLM's `choices[].logprobs` (OpenAI's shape) as the engine's records."""
    return tuple(
        TokenLogprob(
            e["token"],
            e["logprob"],
            tuple((t["token"], t["logprob"]) for t in e.get("top_logprobs") or ()),
        )
        for e in (logprobs or {}).get("content") or ()
    )


class _TryAnother(Exception):
    """This replica cannot serve the request, and nothing was generated: use another one."""


def _describe(exc: object) -> str:
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc)


def _message(body: dict[str, Any]) -> str:
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(body.get("message") or err or body)


def _message_text(response: httpx.Response) -> str:
    try:
        return _message(response.json())
    except ValueError:
        return response.text[:500]


@contextlib.contextmanager
def fleet_asleep(urls: list[str], *, level: int = 1, timeout: float = 60.0) -> Iterator[None]:
    """Put every vLLM replica to sleep for the block (a refresh training on their GPU), and wake
    them afterwards whatever happens. For processes without a gateway engine (``prefloop
    worker``); gateways notice through ``/is_sleeping`` within ``PREFLOOP_VLLM_HEALTH_SECONDS``."""
    with httpx.Client(timeout=timeout) as client:
        for url in urls:
            try:
                client.post(f"{url.rstrip('/')}/sleep", params={"level": level, "mode": "wait"})
            except httpx.HTTPError as exc:
                log.warning("could not put vLLM at %s to sleep: %s", url, exc)
        try:
            yield
        finally:
            for url in urls:
                try:
                    client.post(f"{url.rstrip('/')}/wake_up")
                except httpx.HTTPError as exc:
                    log.error("could not wake vLLM at %s: %s; POST /wake_up by hand", url, exc)
