"""The embedded engine: transformers + peft in this process.

One worker thread owns the model. Generation, adapter loads and unloads all run there in order,
so no request ever sees an adapter half-loaded and the event loop never waits on the model.
Requests wait in a bounded queue; a full queue is an `OverloadedError` (HTTP 503), not a hang.

Our own decode loop instead of `model.generate`: it streams every choice of an `n>1` request
token by token, applies stop strings exactly (held-back text is never sent and then retracted),
uses a per-request `torch.Generator` for `seed` (no global RNG state shared between requests),
and passes peft's `adapter_names` so the adapter is chosen per request, not by mutating the
model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.core.errors import (
    EngineError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
)
from service.engines.base import ChoiceDelta, GenerationRequest

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
_END = object()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass(eq=False)
class _Job:
    fn: Callable[[_Job], Any]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
            self.cancelled.set()


class LocalStream:
    """Async iterator over one request's deltas; `cancel()` stops generation at the next token."""

    def __init__(self, job: _Job, prompt_tokens: int, release: Callable[[], None]):
        self._job = job
        self.prompt_tokens = prompt_tokens
        self._release = release
        self._released = False

    def cancel(self) -> None:
        self._job.cancelled.set()
        self._release_once()

    def _release_once(self) -> None:
        if not self._released:
            self._released = True
            self._release()

    async def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        try:
            while True:
                item = await self._job.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()


class LocalEngine:
    def __init__(
        self,
        model_path: str,
        *,
        model_name: str,
        device: str = "auto",
        dtype: str = "auto",
        max_queue: int = 32,
        torch_threads: int = 0,
    ):
        self.model_path = model_path
        self.model_name = model_name
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_queue = max_queue
        self.torch_threads = torch_threads
        self.model: Any = None
        self.tokenizer: Any = None
        self._adapters: dict[str, str] = {}  # name -> path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(max_queue)
        self._worker: threading.Thread | None = None
        self._ready = False
        self._eos: set[int] = set()

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._worker = threading.Thread(target=self._work, name="prefloop-engine", daemon=True)
        self._worker.start()
        self._ready = True

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.chat_template is None:
            raise EngineError(f"{self.model_path} has no chat template; use an instruct model")
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        log.info(
            "loaded %s on %s (%s) in %.1fs",
            self.model_path,
            self.device,
            self.dtype,
            time.perf_counter() - t0,
        )

    async def aclose(self) -> None:
        self._ready = False
        if self._worker is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._worker.join, 30)
            self._worker = None

    def is_ready(self) -> bool:
        return self._ready

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    # --- adapters (run on the worker thread, between generations) ---------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        if name == BASE_ADAPTER or name == self.model_name:
            raise InvalidRequestError(f"adapter name {name!r} is reserved", param="name")
        if not (Path(path) / "adapter_config.json").is_file():
            raise NotFoundError(f"no PEFT adapter at {path} (adapter_config.json missing)")
        await self._call(lambda _job: self._load_adapter(name, path))

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self._adapters:
            raise InvalidRequestError(
                f"adapter {name!r} is already loaded; versions are immutable, load a new name",
                param="name",
            )
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        await self._call(lambda _job: self._unload_adapter(name))

    def _unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise NotFoundError(f"adapter {name!r} is not loaded")
        del self._adapters[name]
        if self._adapters:
            self.model.delete_adapter(name)
        else:  # the last one: back to the plain model, no peft hooks in the hot path
            self.model = self.model.unload()
            self.model.eval()

    async def _call(self, fn: Callable[[_Job], Any]) -> Any:
        """Run `fn` on the worker thread (after queued generations) and return its result."""
        if not self._ready:
            raise NotReadyError("the model is still loading; retry shortly")
        job = _Job(fn=lambda j: j.emit(fn(j)), loop=asyncio.get_running_loop())
        self._jobs.put(job)
        item = await job.out.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # --- generation ------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.prompt_ids(messages))

    async def generate(self, request: GenerationRequest) -> LocalStream:
        if not self._ready:
            raise NotReadyError("the model is still loading; retry shortly")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise NotFoundError(f"adapter {request.adapter!r} is not loaded")
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(
                f"the generation queue is full ({self.max_queue} requests); retry shortly"
            )
        try:
            ids = self.prompt_ids(request.messages)
            job = _Job(
                fn=lambda j: self._run(j, request, ids),
                loop=asyncio.get_running_loop(),
            )
            self._jobs.put(job)
        except BaseException:
            self._slots.release()
            raise
        return LocalStream(job, len(ids), self._slots.release)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.emit(_END)
                continue
            try:
                job.fn(job)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to its request
                log.exception("engine job failed")
                job.emit(
                    exc
                    if isinstance(exc, EngineError | InvalidRequestError | NotFoundError)
                    else EngineError(f"generation failed: {type(exc).__name__}: {exc}")
                )
            job.emit(_END)

    @torch.inference_mode()
    def _run(self, job: _Job, request: GenerationRequest, prompt: list[int]) -> None:
        p = request.params
        n = p.n
        kwargs: dict[str, Any] = {}
        if self._adapters:  # the model is a PeftModel: choose the adapter per row
            kwargs["adapter_names"] = [request.adapter or BASE_ADAPTER] * n
        elif request.adapter is not None:
            raise NotFoundError(f"adapter {request.adapter!r} is not loaded")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise NotFoundError(f"adapter {request.adapter!r} was unloaded; retry")

        gen = torch.Generator().manual_seed(
            p.seed if p.seed is not None else random.getrandbits(63)
        )
        input_ids = torch.tensor([prompt], device=self.device).expand(n, -1)
        out = self.model(input_ids=input_ids, use_cache=True, **kwargs)
        past, logits = out.past_key_values, out.logits[:, -1, :].float()
        decoders = [_Detok(self.tokenizer, p.stop) for _ in range(n)]
        counts = torch.zeros(n, logits.shape[-1], device=logits.device)
        pad = next(iter(self._eos)) if self._eos else 0

        for step in range(p.max_tokens):
            if job.cancelled.is_set():
                for i, d in enumerate(decoders):
                    if d.finish is None:
                        job.emit(ChoiceDelta(i, "", "cancelled", len(d.tokens)))
                return
            logits = _apply_penalties(logits, counts, p)
            next_ids = _sample(logits, p.temperature, p.top_p, gen).tolist()
            last = step == p.max_tokens - 1
            for i, d in enumerate(decoders):
                if d.finish is not None:
                    next_ids[i] = pad
                    continue
                text = d.push(next_ids[i], is_eos=next_ids[i] in self._eos, last=last)
                if text or d.finish:
                    job.emit(ChoiceDelta(i, text, d.finish, len(d.tokens)))
                if d.finish is None:
                    counts[i, next_ids[i]] += 1
            if all(d.finish is not None for d in decoders):
                return
            step_ids = torch.tensor(next_ids, device=self.device).unsqueeze(1)
            out = self.model(input_ids=step_ids, past_key_values=past, use_cache=True, **kwargs)
            past, logits = out.past_key_values, out.logits[:, -1, :].float()


class _Detok:
    """Incremental detokenisation with stop strings for one choice.

    Text that could still turn into a stop string, or that ends in a partial UTF-8 character,
    is held back, so nothing sent to the client is ever retracted.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.finish: str | None = None

    def push(self, token: int, *, is_eos: bool, last: bool) -> str:
        if is_eos:
            self.finish = "stop"
            return self._flush(self._text())
        self.tokens.append(token)
        text = self._text()
        for s in self.stop:
            at = text.find(s, max(0, len(self.sent) - len(s)))
            if at != -1:
                self.finish = "stop"
                return self._flush(text[:at])
        if last:
            self.finish = "length"
            return self._flush(text)
        safe = text[: max(0, len(text) - self.hold)]
        return self._flush(safe.rstrip("\ufffd"))

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _flush(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _apply_penalties(logits: torch.Tensor, counts: torch.Tensor, p: Any) -> torch.Tensor:
    # OpenAI's definition: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
    if p.frequency_penalty:
        logits = logits - counts * p.frequency_penalty
    if p.presence_penalty:
        logits = logits - (counts > 0).float() * p.presence_penalty
    if p.logit_bias:
        idx = torch.tensor(list(p.logit_bias.keys()), device=logits.device)
        val = torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
        logits = logits.index_add(1, idx, val.expand(logits.shape[0], -1))
    return logits


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    # The generator lives on the CPU, so sample there: one small (n, vocab) copy per token.
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1)
