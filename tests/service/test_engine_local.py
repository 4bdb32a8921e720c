"""The embedded engine on a tiny random Llama: streaming, stop strings, seeds, the bounded queue,
and several LoRA adapters served side by side."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from service.core.errors import EngineError, NotFoundError, NotReadyError, OverloadedError
from service.engines.base import GenerationRequest, SamplingParams
from service.engines.local import LocalEngine, _Detok
from tests.conftest import make_adapter

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
# The tiny random model mostly repeats one token; a sampled answer has variety to test on.
VARIED = SamplingParams(max_tokens=30, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_llama_dir, root / name, i) for i, name in enumerate(["a", "b"])}


async def collect(engine: LocalEngine, request: GenerationRequest) -> dict[int, list]:
    stream = await engine.generate(request)
    out: dict[int, list] = {}
    async for d in stream:
        out.setdefault(d.index, []).append(d)
    return out


def text_of(deltas: list) -> str:
    return "".join(d.text for d in deltas)


def greedy(max_tokens: int = 20, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


@pytest.fixture
def engine(tiny_llama_dir: Path):
    eng = LocalEngine(str(tiny_llama_dir), model_name="tiny", max_queue=4)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.aclose())


def run(coro):
    return asyncio.run(coro)


def test_stream_matches_hf_generate(engine: LocalEngine, tiny_llama_dir: Path) -> None:
    """Our decode loop's greedy tokens equal transformers' own `generate`."""
    out = run(collect(engine, GenerationRequest(HELLO, greedy(max_tokens=24))))
    ids = torch.tensor([engine.prompt_ids(HELLO)])
    ref = engine.model.generate(
        ids, max_new_tokens=24, do_sample=False, eos_token_id=list(engine._eos) or None
    )
    expected = engine.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert text_of(out[0]) == expected
    assert out[0][-1].finish_reason in ("stop", "length")
    assert out[0][-1].completion_tokens == min(24, ref.shape[1] - ids.shape[1])


def test_seed_reproduces_and_choices_differ(engine: LocalEngine) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, n=3, seed=7)
    a = run(collect(engine, GenerationRequest(HELLO, params)))
    b = run(collect(engine, GenerationRequest(HELLO, params)))
    assert sorted(a) == [0, 1, 2]
    assert [text_of(a[i]) for i in range(3)] == [text_of(b[i]) for i in range(3)]
    assert len({text_of(a[i]) for i in range(3)}) > 1
    c = run(collect(engine, GenerationRequest(HELLO, SamplingParams(16, 1.0, n=3, seed=8))))
    assert [text_of(c[i]) for i in range(3)] != [text_of(a[i]) for i in range(3)]


def test_tiny_top_p_is_greedy(engine: LocalEngine) -> None:
    g = run(collect(engine, GenerationRequest(HELLO, greedy(16))))
    p = run(collect(engine, GenerationRequest(HELLO, SamplingParams(16, 1.0, top_p=1e-6, seed=3))))
    assert text_of(g[0]) == text_of(p[0])


def test_stop_string_is_never_streamed(engine: LocalEngine) -> None:
    full = text_of(run(collect(engine, GenerationRequest(HELLO, VARIED)))[0])
    assert len(full) > 30
    stop = full[20:26]  # characters that very likely span token boundaries
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=11, stop=(stop,))
    out = run(collect(engine, GenerationRequest(HELLO, params)))[0]
    assert text_of(out) == full[: full.index(stop)]
    assert out[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in out)


def test_detok_holds_back_a_stop_string_split_over_tokens(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok("The answer is forty two. Bye", add_special_tokens=False)["input_ids"]
    d = _Detok(tok, ("two. B",))
    sent = [d.push(t, is_eos=False, last=False) for t in ids]
    assert "".join(sent) == "The answer is forty "
    assert d.finish == "stop"


def test_penalties_change_the_output(engine: LocalEngine) -> None:
    plain = run(collect(engine, GenerationRequest(HELLO, greedy(30))))[0]
    penalised = run(collect(engine, GenerationRequest(HELLO, greedy(30, frequency_penalty=2.0))))
    assert text_of(plain) != text_of(penalised[0])
    (paris,) = engine.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    biased = run(collect(engine, GenerationRequest(HELLO, greedy(3, logit_bias={paris: 100}))))
    assert text_of(biased[0]) == " Paris Paris Paris"


def test_full_queue_is_refused_at_once(tiny_llama_dir: Path) -> None:
    async def scenario() -> None:
        eng = LocalEngine(str(tiny_llama_dir), model_name="tiny", max_queue=2)
        await eng.start()
        try:
            held = [await eng.generate(GenerationRequest(HELLO, greedy(2))) for _ in range(2)]
            with pytest.raises(OverloadedError, match="queue is full"):
                await eng.generate(GenerationRequest(HELLO, greedy(2)))
            async for _ in held[0]:
                pass
            # A finished request frees its slot.
            again = await eng.generate(GenerationRequest(HELLO, greedy(2)))
            again.cancel()
            held[1].cancel()
        finally:
            await eng.aclose()

    run(scenario())


def test_cancel_stops_generation(engine: LocalEngine) -> None:
    async def scenario() -> list:
        stream = await engine.generate(GenerationRequest(HELLO, greedy(500)))
        seen = []
        async for d in stream:
            seen.append(d)
            if len(seen) == 3:
                stream.cancel()
        return seen

    seen = run(scenario())
    assert seen[-1].finish_reason == "cancelled"
    assert seen[-1].completion_tokens < 500


def test_adapters_are_chosen_per_request(
    engine: LocalEngine, adapters: dict[str, Path], tiny_llama_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = text_of(run(collect(engine, GenerationRequest(HELLO, greedy(20))))[0])
    for name, path in adapters.items():
        run(engine.load_adapter(name, str(path)))
    assert engine.adapters() == ["a", "b"]

    async def all_at_once() -> list[str]:
        reqs = [GenerationRequest(HELLO, greedy(20), adapter=a) for a in (None, "a", "b", "a")]
        outs = await asyncio.gather(*(collect(engine, r) for r in reqs))
        return [text_of(o[0]) for o in outs]

    got = run(all_at_once())
    assert got[0] == base, "the base model must be unaffected by loaded adapters"
    assert got[1] == got[3] and len({got[0], got[1], got[2]}) == 3

    # Each adapter's output equals a plain peft model built from that adapter alone.
    for name, text in (("a", got[1]), ("b", got[2])):
        ref = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapters[name]
        ).eval()
        ids = torch.tensor([engine.prompt_ids(HELLO)])
        out = ref.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
        expected = engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert text == expected

    with pytest.raises(Exception, match="already loaded"):
        run(engine.load_adapter("a", str(adapters["a"])))
    run(engine.unload_adapter("a"))
    with pytest.raises(NotFoundError):
        run(engine.generate(GenerationRequest(HELLO, greedy(5), adapter="a")))
    run(engine.unload_adapter("b"))
    assert engine.adapters() == []
    assert text_of(run(collect(engine, GenerationRequest(HELLO, greedy(20))))[0]) == base


def test_loading_a_missing_adapter_is_a_clear_error(engine: LocalEngine, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        run(engine.load_adapter("x", str(tmp_path)))


async def _batched(engine: LocalEngine, requests: list[GenerationRequest]) -> list[dict]:
    """Queue all requests while the model thread is held, so they form one batch."""
    import threading

    gate = threading.Event()
    blocker = asyncio.ensure_future(engine._call(lambda _job: gate.wait(30)))
    await asyncio.sleep(0.05)  # the model thread is now inside the blocker
    streams = [await engine.generate(r) for r in requests]
    gate.set()
    await blocker

    async def drain(stream) -> dict:
        out: dict[int, list] = {}
        async for d in stream:
            out.setdefault(d.index, []).append(d)
        return out

    return await asyncio.gather(*(drain(s) for s in streams))


async def _staggered(engine: LocalEngine, requests: list[GenerationRequest]) -> list[dict]:
    """Each request starts once the one before has streamed a few deltas: mid-batch."""
    outs: list[dict] = [{} for _ in requests]

    async def drain(k: int, stream) -> None:
        async for d in stream:
            outs[k].setdefault(d.index, []).append(d)

    tasks = []
    for k, r in enumerate(requests):
        tasks.append(asyncio.create_task(drain(k, await engine.generate(r))))
        while k < len(requests) - 1 and sum(map(len, outs[k].values())) < 3:
            await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)
    return outs


def count_forwards(engine: LocalEngine) -> dict[str, int]:
    real = engine.model.forward
    calls = {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    engine.model.forward = counted
    return calls


def test_concurrent_requests_are_decoded_as_one_batch(engine: LocalEngine) -> None:
    prompts = ["Hi", "Tell me about the moon, please.", "What is 2+2?", "A longer question here?"]
    requests = [
        GenerationRequest([{"role": "user", "content": p}], SamplingParams(8 + i, 1.0, seed=i))
        for i, p in enumerate(prompts)
    ]
    alone = [run(collect(engine, r)) for r in requests]
    calls = count_forwards(engine)
    together = run(_batched(engine, requests))
    # One prefill and one step per token of the longest request, not one per request.
    assert calls["n"] <= 8 + len(prompts)
    for a, t, r in zip(alone, together, requests, strict=True):
        assert t[0][-1].completion_tokens == a[0][-1].completion_tokens
        assert t[0][-1].finish_reason == a[0][-1].finish_reason
        if a[0][-1].finish_reason == "length":
            assert t[0][-1].completion_tokens == r.params.max_tokens


@pytest.mark.slow
def test_batched_greedy_answers_equal_one_at_a_time(smollm2_dir: Path) -> None:
    """Left padding and per-row positions are right: SmolLM2's greedy answers do not depend
    on what else is in the batch."""
    eng = LocalEngine(str(smollm2_dir), model_name="smol")
    run(eng.start())
    try:
        prompts = [
            "What is the capital of France?",
            "Name three primary colours.",
            "Write one short sentence about autumn leaves falling in the park.",
            "Hi!",
        ]
        requests = [
            GenerationRequest([{"role": "user", "content": p}], greedy(24)) for p in prompts
        ]
        alone = [text_of(run(collect(eng, r))[0]) for r in requests]
        together = [text_of(o[0]) for o in run(_batched(eng, requests))]
        assert together == alone
        assert "Paris" in together[0]
        # Arriving one by one, each joins the running batch (its cache merged in, padded).
        staggered = [text_of(o[0]) for o in run(_staggered(eng, requests))]
        assert staggered == alone
    finally:
        run(eng.aclose())


def test_adapter_swaps_run_between_decode_steps(
    engine: LocalEngine, adapters: dict[str, Path]
) -> None:
    """A load waits for one decode step, not for the running batch, and does not disturb it;
    an adapter that rows are generating with cannot be unloaded under them."""
    alone = text_of(run(collect(engine, GenerationRequest(HELLO, greedy(300))))[0])

    async def scenario() -> tuple[str, int, int, str]:
        stream = await engine.generate(GenerationRequest(HELLO, greedy(300)))
        seen: list = []

        async def consume() -> None:
            async for d in stream:
                seen.append(d)

        task = asyncio.create_task(consume())
        while len(seen) < 5:
            await asyncio.sleep(0.005)
        await engine.load_adapter("a", str(adapters["a"]))
        at_load = len(seen)
        busy = await engine.generate(GenerationRequest(HELLO, greedy(300), adapter="a"))
        first = await anext(aiter(busy))  # "a" is now decoding
        with pytest.raises(Exception, match="is generating answers"):
            await engine.unload_adapter("a")
        busy.cancel()
        async for _ in busy:  # until its row has left the batch
            pass
        await task
        await engine.unload_adapter("a")
        return text_of(seen), at_load, len(seen), first.text

    text, at_load, total, _ = run(scenario())
    assert text == alone  # the running answer is exactly what it would have been
    assert at_load < total  # the load finished while the answer was still being generated
    assert engine.adapters() == []


async def decoding(
    engine: LocalEngine, request: GenerationRequest, deltas: int
) -> tuple[asyncio.Task, list]:
    """Start ``request`` and return once ``deltas`` of its deltas arrived: it is decoding. The
    task consumes the rest into the list."""
    seen: list = []

    async def consume(stream) -> None:
        async for d in stream:
            seen.append(d)

    task = asyncio.create_task(consume(await engine.generate(request)))
    while len(seen) < deltas:
        await asyncio.sleep(0.002)
    return task, seen


def test_a_request_arriving_mid_batch_joins_it(engine: LocalEngine) -> None:
    """Continuous batching: a short request that arrives while a long answer is decoding runs
    beside it and finishes first; neither answer changes."""
    short = GenerationRequest([{"role": "user", "content": "What is 2+2?"}], VARIED)
    long = GenerationRequest(HELLO, greedy(300))
    alone_short = text_of(run(collect(engine, short))[0])
    alone_long = text_of(run(collect(engine, long))[0])

    async def scenario() -> tuple[str, str, int]:
        task, seen = await decoding(engine, long, 5)
        deltas = (await collect(engine, short))[0]
        at_short_end = len(seen)
        await task
        return text_of(deltas), text_of(seen), at_short_end

    got_short, got_long, at_short_end = run(scenario())
    assert (got_short, got_long) == (alone_short, alone_long)
    assert at_short_end < 290  # the short answer ended long before the long one


@pytest.mark.slow
def test_a_failing_row_fails_alone_and_the_batch_finishes(smollm2_dir: Path) -> None:
    """Isolation on the real model: a request whose sampling fails inside a running batch (a
    logit_bias id past the vocabulary, which the gateway refuses but the engine must survive)
    gets the error; the request decoding beside it finishes with exactly its answer alone, and
    the next request is served."""
    eng = LocalEngine(str(smollm2_dir), model_name="smol")
    run(eng.start())
    question = [{"role": "user", "content": "What is the capital of France?"}]
    good = GenerationRequest(question, greedy(40))
    bad = GenerationRequest(HELLO, greedy(40, logit_bias={eng.vocab_size() + 7: 1.0}))
    try:
        alone = text_of(run(collect(eng, good))[0])

        async def scenario() -> tuple[str, str | None, Exception | None]:
            task, seen = await decoding(eng, good, 3)
            error = None
            try:
                await collect(eng, bad)
            except Exception as exc:  # noqa: BLE001 - the assertion below names it
                error = exc
            await task
            return text_of(seen), seen[-1].finish_reason, error

        text, finish, error = run(scenario())
        assert isinstance(error, EngineError) and "index" in str(error).lower(), error
        assert text == alone and "Paris" in text
        assert finish in ("stop", "length")
        # The engine is healthy afterwards: the same request again, alone, same answer.
        assert text_of(run(collect(eng, good))[0]) == alone
    finally:
        run(eng.aclose())


def test_a_model_still_loading_is_a_retryable_503_not_a_crash(tiny_llama_dir: Path) -> None:
    """What a chat asks the engine before generating (context length, prompt tokens,
    vocabulary) says "still loading" (503, retry) until the model is there."""
    eng = LocalEngine(str(tiny_llama_dir), model_name="tiny")
    hello = [{"role": "user", "content": "Hi"}]
    for ask in (eng.context_length, eng.vocab_size, lambda: eng.count_prompt_tokens(hello)):
        with pytest.raises(NotReadyError, match="still loading") as caught:
            ask()
        assert caught.value.status_code == 503
    run(eng.start())
    try:
        assert eng.context_length() > 0 and eng.count_prompt_tokens(hello) > 0
    finally:
        run(eng.aclose())
