"""The embedded engine: transformers + peft in this process.

One worker thread owns the model. Generation, adapter loads and unloads all run there, so no
request ever sees an adapter half-loaded and the event loop never waits on the model. Loads and
unloads jump the queue and run between two decode steps of a running batch: a hot-swap waits
for one token, not for a whole batch of answers (the KV caches of running rows stay valid,
because adding or removing a LoRA never touches the base weights or another adapter's).
Requests wait in a bounded queue; a full queue is an `OverloadedError` (HTTP 503), not a hang.

Our own decode loop instead of `model.generate`: it streams every choice of an `n>1` request
token by token, applies stop strings exactly (held-back text is never sent and then retracted),
uses a per-request `torch.Generator` for `seed` (no global RNG state shared between requests),
and passes peft's `adapter_names` so the adapter is chosen per request, not by mutating the
model.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.core.errors import (
    ConflictError,
    EngineError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
)
from service.engines import grammar
from service.engines.base import ChoiceDelta, GenerationRequest, TokenLogprob

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
    """Work for the model thread: a call (`fn`) or a generation (`generation`)."""

    fn: Callable[[_Job], Any] | None
    loop: asyncio.AbstractEventLoop
    generation: tuple[GenerationRequest, list[int]] | None = None
    grammar: Any = None  # the request's compiled response_format, if it has one
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
    # No tool-call parser here, and SmolLM2's chat template renders no tools: `tools` are
    # refused with a 400 that points at the vLLM engine (`service.chat.plan_chat`).
    supports_tools = False

    def __init__(
        self,
        model_path: str,
        *,
        model_name: str,
        device: str = "auto",
        dtype: str = "auto",
        max_queue: int = 32,
        max_batch: int = 16,
        torch_threads: int = 0,
        continuous: bool = True,  # False: a batch admits nobody once it runs (bench/batching.py)
    ):
        self.model_path = model_path
        self.model_name = model_name
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.torch_threads = torch_threads
        self.continuous = continuous
        self.model: Any = None
        self.tokenizer: Any = None
        self._adapters: dict[str, str] = {}  # name -> path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._backlog: deque[_Job | None] = deque()  # taken from _jobs, not run: before _jobs
        self._calls: queue.SimpleQueue[_Job] = queue.SimpleQueue()  # loads/unloads, run first
        self._running_adapters: set[str | None] = set()  # adapters of rows being decoded
        self._slots = threading.BoundedSemaphore(max_queue)
        self._worker: threading.Thread | None = None
        self._ready = False
        self._eos: set[int] = set()
        self._pad = 0
        self._grammars: grammar.Grammars | None = None

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
        # transformers 5.2x renamed the KV cache argument and output `past_key_values` -> `cache`
        # (the old name warns, and goes in 5.40); use whichever this model's forward takes.
        params = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._pad = min(self._eos) if self._eos else 0
        width = int(self.model.get_output_embeddings().weight.shape[0])
        self._grammars = grammar.Grammars(self.tokenizer, width, self._eos)
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

    def _check_ready(self) -> None:
        # A chat arriving while the model loads is a 503 to retry, not a 500.
        if not self._ready:
            raise NotReadyError("the model is still loading; retry shortly")

    def context_length(self) -> int:
        self._check_ready()
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def vocab_size(self) -> int:
        # The LM head's width: the logits a bias is added to (a bad id would fail the batch).
        self._check_ready()
        return int(self.model.get_output_embeddings().weight.shape[0])

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
        if name in self._running_adapters:
            raise ConflictError(f"adapter {name!r} is generating answers; unload it when done")
        if len(self._adapters) > 1:
            self.model.delete_adapter(name)
        else:  # the last one: back to the plain model, no peft hooks in the hot path
            self.model = self.model.unload()
            self.model.eval()
        del self._adapters[name]

    async def _call(self, fn: Callable[[_Job], Any]) -> Any:
        """Run `fn` on the worker thread, before queued generations and between the decode steps
        of a running batch; return its result."""
        self._check_ready()
        job = _Job(fn=lambda j: j.emit(fn(j)), loop=asyncio.get_running_loop())
        self._calls.put(job)
        self._jobs.put(job)  # wakes an idle worker; it finds the call already run, or runs it
        item = await job.out.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # --- generation ------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        self._check_ready()
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.prompt_ids(messages))

    async def generate(self, request: GenerationRequest) -> LocalStream:
        self._check_ready()
        if request.adapter is not None and request.adapter not in self._adapters:
            raise NotFoundError(f"adapter {request.adapter!r} is not loaded")
        # Compiled off the event loop (cached per schema); a schema it refuses is a 400.
        fmt = request.params.response_format
        compiled = await asyncio.to_thread(self._grammars.compile, fmt) if fmt else None
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(
                f"the generation queue is full ({self.max_queue} requests); retry shortly"
            )
        try:
            ids = self.prompt_ids(request.messages)
            job = _Job(
                fn=None,
                loop=asyncio.get_running_loop(),
                generation=(request, ids),
                grammar=compiled,
            )
            self._jobs.put(job)
        except BaseException:
            self._slots.release()
            raise
        return LocalStream(job, len(ids), self._slots.release)

    def _work(self) -> None:
        while True:
            job = self._backlog.popleft() if self._backlog else self._jobs.get()
            if job is None:
                return
            if job.generation is None:
                self._run_calls()
                continue
            self._backlog.appendleft(job)
            self._run_batch()
            if self._backlog and self._backlog[0] is job:  # not taken: never spin on it
                self._backlog.popleft()
                job.emit(EngineError("generation failed before it started; see the log"))
                job.emit(_END)

    def _run_calls(self) -> None:
        while True:
            try:
                job = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                # Called between decode steps too: weights must not become inference tensors.
                with torch.inference_mode(False):
                    job.fn(job)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller
                job.emit(_as_engine_error(exc))
            job.emit(_END)

    def _waiting(self, free: int) -> list[_Job]:
        """Generations waiting in line that fit in ``free`` rows, in arrival order. A queued
        adapter load or unload runs here; the first one that does not fit, and shutdown, keep
        their place at the head of the line (first come, first served)."""
        taken: list[_Job] = []
        while True:
            try:
                job = self._backlog.popleft() if self._backlog else self._jobs.get_nowait()
            except queue.Empty:
                return taken
            if job is not None and job.generation is None:
                self._run_calls()
                continue
            # An empty batch takes the first request whatever its `n` (more than max_batch
            # choices decode together rather than never).
            too_big = job is not None and job.generation[0].params.n > free
            if job is None or (too_big and (taken or free < self.max_batch)):
                self._backlog.appendleft(job)
                return taken
            taken.append(job)
            free -= job.generation[0].params.n

    def _admit(self, jobs: list[_Job]) -> list[_Gen]:
        gens = []
        for job in jobs:
            request, prompt = job.generation
            if job.cancelled.is_set():
                job.emit(_END)
            elif request.adapter is not None and request.adapter not in self._adapters:
                job.emit(NotFoundError(f"adapter {request.adapter!r} was unloaded; retry"))
                job.emit(_END)
            else:
                gens.append(_Gen(job, request, prompt, self.tokenizer))
        return gens

    def _run_batch(self) -> None:
        batch = _Batch()
        try:
            self._decode(batch)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its requests
            log.exception("generation failed")
            error = _as_engine_error(exc)
            for g in batch.gens:
                if not g.ended:
                    g.job.emit(error)
                    g.job.emit(_END)
        finally:
            self._running_adapters = set()

    def _join(self, batch: _Batch, gens: list[_Gen]) -> None:
        """Prefill newly admitted requests and merge them into the running batch. A failure
        here (a prompt the model cannot take, say) fails those requests only: the rows already
        decoding go on."""
        try:
            new = self._prefill(gens)
        except Exception as exc:  # noqa: BLE001 - reported to the new requests alone
            for g in gens:
                g.fail(exc)
            return
        batch.gens.extend(gens)
        batch.merge(new)

    def _forward(self, rows: list[tuple[_Gen, int]], **inputs: Any) -> Any:
        if self._adapters:  # the model is a PeftModel: peft picks each row's adapter
            inputs["adapter_names"] = [g.request.adapter or BASE_ADAPTER for g, _ in rows]
        return self.model(use_cache=True, **inputs)

    @torch.inference_mode()
    def _prefill(self, gens: list[_Gen]) -> _Batch:
        """The prompts of newly admitted requests in one forward: their rows, ready to sample."""
        rows = [(g, i) for g in gens for i in range(g.request.params.n)]
        width = max(len(g.prompt) for g in gens)
        # Left padding, so every row's next token sits in the last column.
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (g, _) in enumerate(rows):
            input_ids[r, width - len(g.prompt) :] = torch.tensor(g.prompt)
            mask[r, width - len(g.prompt) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(rows, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        logits = out.logits[:, -1, :].float()
        return _Batch(
            gens=gens, rows=rows, past=getattr(out, self._cache_name), mask=mask,
            positions=positions[:, -1], logits=logits,
            counts=torch.zeros(len(rows), logits.shape[-1], device=logits.device),
        )  # fmt: skip

    @torch.inference_mode()
    def _decode(self, batch: _Batch) -> None:
        """Continuous batching: between two decode steps, finished rows leave the batch and
        requests waiting in line join it (their prompts prefilled, their KV cache merged in), so
        a request arriving mid-batch waits one step, not for the longest answer in the batch."""
        while True:
            self._running_adapters = {g.request.adapter for g, _ in batch.rows}
            self._run_calls()  # a pending adapter load or unload waits one step, not the batch
            free = self.max_batch - len(batch.rows)
            if free > 0 and (not batch.rows or (self.continuous and _mergeable(batch.past))):
                gens = self._admit(self._waiting(free))
                if gens:
                    self._join(batch, gens)
            if not batch.rows:
                return
            next_ids, logprobs = self._sample_rows(batch)
            for r, (g, i) in enumerate(batch.rows):
                if g.decoders[i].finish is None:
                    try:
                        g.push(i, int(next_ids[r]), self._eos, logprobs.get(r))
                    except Exception as exc:  # noqa: BLE001 - reported to its caller alone
                        g.fail(exc)
                        continue
                    batch.counts[r, next_ids[r]] += 1
            for g in batch.live():
                g.step_done()
            batch.gens = [g for g in batch.gens if not g.ended]

            keep = [r for r, (g, i) in enumerate(batch.rows) if g.decoders[i].finish is None]
            if len(keep) < len(batch.rows):  # drop finished rows: no compute is spent on them
                batch.select(keep)
                next_ids = next_ids[keep]
            if not batch.rows:
                continue  # the batch is empty: whoever waits starts a fresh one
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
            batch.positions = batch.positions + 1
            out = self._forward(
                batch.rows,
                input_ids=next_ids.to(self.device).unsqueeze(1),
                attention_mask=batch.mask,
                position_ids=batch.positions.unsqueeze(1),
                **{self._cache_name: batch.past},
            )
            batch.past, batch.logits = getattr(out, self._cache_name), out.logits[:, -1, :].float()

    def _sample_rows(self, batch: _Batch) -> tuple[torch.Tensor, dict[int, TokenLogprob]]:
        """Each row's next token, and its log-probs for the requests that asked for them."""
        next_ids = torch.full((len(batch.rows),), self._pad, dtype=torch.long)
        logprobs: dict[int, TokenLogprob] = {}
        for g in batch.live():
            idx = [r for r, (h, _) in enumerate(batch.rows) if h is g]
            if g.job.cancelled.is_set():
                g.cancel()
                continue
            p = g.request.params
            try:  # one request's sampling failing fails that request, not the batch
                logits = _apply_penalties(batch.logits[idx], batch.counts[idx], p)
                if g.matchers is not None:  # a response_format: only what it allows
                    logits = grammar.mask(logits, [g.matchers[batch.rows[r][1]] for r in idx])
                next_ids[idx] = _sample(logits, p.temperature, p.top_p, g.rng).cpu()
                if p.logprobs is not None:
                    rows = _logprobs(batch.logits[idx], next_ids[idx], p.logprobs, self.tokenizer)
                    logprobs.update(zip(idx, rows, strict=True))
            except Exception as exc:  # noqa: BLE001 - reported to its caller alone
                g.fail(exc)
        return next_ids, logprobs


@dataclass(eq=False)
class _Batch:
    """The rows being decoded together: (request, choice) pairs and their aligned state."""

    gens: list[_Gen] = field(default_factory=list)
    rows: list[tuple[_Gen, int]] = field(default_factory=list)
    past: Any = None  # the KV cache, one row per entry of `rows`
    mask: Any = None  # (rows, cache length): 0 for left padding
    positions: Any = None  # (rows,): each row's position of its last token
    logits: Any = None  # (rows, vocab): the next token's logits
    counts: Any = None  # (rows, vocab): tokens generated so far, for the penalties

    def live(self) -> list[_Gen]:
        return [g for g in self.gens if any(h is g for h, _ in self.rows)]

    def select(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.past = [], None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.past.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.logits, self.counts = self.logits[index], self.counts[index]
        self.rows = [self.rows[r] for r in keep]

    def merge(self, new: _Batch) -> None:
        """Append ``new``'s rows; the shorter cache is padded on the left (masked out), so
        every row's latest token stays in the last column."""
        if not self.rows:
            self.rows, self.past, self.mask = new.rows, new.past, new.mask
            self.positions, self.logits, self.counts = new.positions, new.logits, new.counts
            return
        width = max(self.mask.shape[1], new.mask.shape[1])
        for a, b in zip(self.past.layers, new.past.layers, strict=True):
            a.keys = torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)])
            a.values = torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(new.mask, width, 1)])
        self.positions = torch.cat([self.positions, new.positions])
        self.logits = torch.cat([self.logits, new.logits])
        self.counts = torch.cat([self.counts, new.counts])
        self.rows = self.rows + new.rows


def _left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _mergeable(past: Any) -> bool:
    """Rows can join a running batch when its KV cache is plain per-layer tensors (a full
    attention model's DynamicCache); a sliding-window or other cache runs batch by batch."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(past, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _as_engine_error(exc: Exception) -> Exception:
    if isinstance(exc, EngineError | InvalidRequestError | NotFoundError | ConflictError):
        return exc
    return EngineError(f"generation failed: {type(exc).__name__}: {exc}")


class _Gen:
    """One request's state inside a batch: its RNG, its choices' decoders, its step count."""

    def __init__(self, job: _Job, request: GenerationRequest, prompt: list[int], tokenizer: Any):
        self.job, self.request, self.prompt = job, request, prompt
        seed = request.params.seed
        # Per request: its random draws do not depend on what else shares the batch.
        self.rng = torch.Generator().manual_seed(
            seed if seed is not None else random.getrandbits(63)
        )
        self.decoders = [_Detok(tokenizer, request.params.stop) for _ in range(request.params.n)]
        self.matchers = grammar.matchers(job.grammar, request.params.n)  # one per choice
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(request.params.n)]
        self.steps = 0
        self.ended = False

    def push(self, i: int, token: int, eos: set[int], logprob: TokenLogprob | None) -> None:
        d = self.decoders[i]
        if self.matchers is not None and not self.matchers[i].accept_token(token):
            raise EngineError(f"token {token} breaks the response_format grammar")
        last = self.steps == self.request.params.max_tokens - 1
        if logprob is not None and token not in eos:  # the answer's tokens (EOS is not text)
            self.logprobs[i].append(logprob)
        text = d.push(token, is_eos=token in eos, last=last)
        if text or d.finish:
            # Held-back text (a possible stop string) goes out later with its tokens' log-probs.
            entries, self.logprobs[i] = tuple(self.logprobs[i]), []
            self.job.emit(ChoiceDelta(i, text, d.finish, len(d.tokens), entries))

    def fail(self, exc: Exception) -> None:
        """This request alone failed: its choices end and its caller gets the error."""
        log.error("request failed inside the batch: %s: %s", type(exc).__name__, exc)
        for d in self.decoders:
            d.finish = d.finish or "error"
        if not self.ended:
            self.ended = True
            self.job.emit(_as_engine_error(exc))
            self.job.emit(_END)

    def cancel(self) -> None:
        for i, d in enumerate(self.decoders):
            if d.finish is None:
                d.finish = "cancelled"
                self.job.emit(ChoiceDelta(i, "", "cancelled", len(d.tokens)))

    def step_done(self) -> None:
        self.steps += 1
        if not self.ended and all(d.finish is not None for d in self.decoders):
            self.ended = True
            self.job.emit(_END)


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


def _logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, k: int, tokenizer: Any
) -> list[TokenLogprob]:
    """Per row: the chosen token's log-probability and the k most likely tokens'.

    Of the model's own distribution, before temperature, penalties, logit_bias and top_p, as
    vLLM reports them by default (its `logprobs_mode="raw_logprobs"`): a greedy answer's token
    is then always the top-1, and the values do not depend on how it was sampled.
    """
    lp = torch.log_softmax(logits.float(), dim=-1).clamp(min=-9999.0)  # vLLM's floor for -inf
    picked = lp.gather(-1, chosen.to(lp.device).unsqueeze(-1)).squeeze(-1).tolist()
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    out = []
    for row, token in enumerate(chosen.tolist()):
        top = tuple(
            (tokenizer.decode([t]), v)
            for t, v in zip(top_ids[row].tolist(), top_lp[row].tolist(), strict=True)
        )
        out.append(TokenLogprob(tokenizer.decode([token]), picked[row], top))
    return out


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
