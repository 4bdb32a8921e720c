"""Offline regression evaluation: a candidate adapter against the incumbent, on one base model.

    python -m trainer evaluate --base MODEL_DIR --candidate ADAPTER_DIR [--incumbent ADAPTER_DIR]
        [--pairs heldout.jsonl] [--golden golden.jsonl] [--canary canary.jsonl] --out report.json

Each side (an adapter, or the base model where none is given) gets three measures:

- ``pairs``: on held-out DPO rows, the implicit reward r = beta * (log pi(y|x) - log pi_base(y|x))
  of each answer (summed over its tokens); ``accuracy`` is how often r_chosen > r_rejected (a tie
  counts half, so the base scores exactly 0.5) and ``margin`` the mean of r_chosen - r_rejected.
- ``thumbs``: on held-out unpaired rows (lone thumbs), the same implicit reward of each answer;
  ``auc`` is how often a thumbs-up answer outscores a thumbs-down one over every (up, down)
  combination (ties half: the base scores 0.5), ``gap`` the mean reward of ups minus downs.
- ``golden``: greedy answers to the operator's golden items (``trainer.golden``) and their checks.
- ``drift``: greedy answers to fixed neutral prompts (``canary.jsonl``): mean length relative to
  the base, token 3-gram repetition, and KL(pi || pi_base) per token along the side's own answer.

The base model is loaded once; both adapters sit in one ``PeftModel`` under their own names and
the base is the same model with the adapter disabled.

The report's ``samples`` hold up to ``SAMPLES`` held-out prompts with the greedy answer of each
side (and the answers users preferred and disliked, where the row says), for a person to
compare.

With ``cache_dir`` each side's greedy answers (and KL) are kept, keyed by the model's and the
adapter's files, the prompts and ``max_new_tokens``: greedy decoding is deterministic, and the
base and the incumbent (the last refresh's candidate) are the same every refresh, so a refresh
generates for its candidate only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer.data import (
    DataError,
    PairExample,
    Tokens,
    _as_messages,
    collate,
    collate_pairs,
    read_rows,
    tokenize_sequence,
)
from trainer.generate import Generated, _left_padded, generate
from trainer.golden import GoldenError, GoldenItem, failed_checks, load_golden, parse_messages
from trainer.logps import completion_logps
from trainer.quality import links

REPORT_FORMAT = "prefloop-eval/1"
# 2: answers generated 32 at a time (batch composition can move a greedy tie by rounding).
CACHE_FORMAT = "prefloop-eval-cache/2"
SIDES = ("candidate", "incumbent")
MAX_LENGTH = 1024  # prompt + answer tokens of a pair, as TrainConfig.max_length
# A decode step costs about the same for 8 rows as for 32 on a small model (SmolLM2 on 2 CPU
# cores: 71 tok/s at 8, 163 at 32), and greedy answers of 64 tokens are cheap in memory.
SCORE_BATCH = 4  # full-vocabulary logits for KL: batch x length x vocab floats, twice
ANSWER_CHARS = 300  # of a failing golden answer kept in the report
# Held-out prompts answered greedily by both sides, kept in the report so an operator can read
# what the new adapter changed. Not cached: the held-out prompts differ every refresh.
SAMPLES = 8
SAMPLE_CHARS = 2000

Messages = list[dict[str, Any]]
ProgressFn = Callable[[str, int, int], None]
"""Called after every batch with (stage, items done in the stage, items in the stage)."""


def load_canary(path: Path | None = None) -> list[Messages]:
    """The drift prompts: ``path``, or the set shipped with the trainer."""
    if path is None:
        text = resources.files("trainer").joinpath("canary.jsonl").read_text(encoding="utf-8")
        source = "trainer/canary.jsonl"
    else:
        text, source = Path(path).read_text(encoding="utf-8"), str(path)
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append([dict(m) for m in parse_messages(json.loads(line).get("messages"))])
        except (json.JSONDecodeError, AttributeError, GoldenError) as e:
            raise GoldenError(f"{source}:{lineno}: {e}") from e
    return prompts


# --- the model and its sides ------------------------------------------------------------------


def _load(base: Path, adapters: dict[str, Path], device: torch.device) -> torch.nn.Module:
    """The base model once, with every adapter loaded into it under its name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    for name, path in adapters.items():
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
    # Frozen throughout: nothing trains here, and completion_logps needs a frozen LM head.
    return model.requires_grad_(False).eval()


@contextmanager
def _side(model: torch.nn.Module, adapter: str | None) -> Iterator[None]:
    """Run as ``adapter``, or as the base model (None)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        assert adapter is None, f"no adapter {adapter!r} loaded"
        yield
    elif adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


class _Progress:
    """One tqdm bar over all the work, and the caller's per-stage callback."""

    def __init__(self, total: int, enabled: bool, callback: ProgressFn | None):
        self.bar = tqdm(total=total, desc="evaluate", disable=not enabled)
        self.callback = callback

    def stage(self, name: str, total: int) -> Callable[[int], None]:
        done = 0
        self.bar.set_description(name)

        def tick(n: int) -> None:
            nonlocal done
            done += n
            self.bar.update(n)
            if self.callback is not None:
                self.callback(name, done, total)

        return tick


# --- the three measures -----------------------------------------------------------------------


def _pair_examples(rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[PairExample]:
    """Rows tokenised as ``trainer.data.load_examples`` does for a file; too-long rows dropped."""
    examples = []
    for i, row in enumerate(rows):
        try:
            prompt = _as_messages(row["prompt"], "user")
            chosen = _as_messages(row["chosen"], "assistant")
            rejected = _as_messages(row["rejected"], "assistant")
        except (KeyError, TypeError, DataError) as e:
            raise DataError(f"pairs row {i}: not a preference row ({e})") from e
        c = tokenize_sequence(tokenizer, prompt, chosen, MAX_LENGTH)
        r = tokenize_sequence(tokenizer, prompt, rejected, MAX_LENGTH)
        if c is None or r is None:
            continue
        p = min(c.prompt_len, r.prompt_len)  # one shared prompt, so collate_pairs runs it once
        examples.append(PairExample(Tokens(c.ids, p), Tokens(r.ids, p)))
    return examples


def _unpaired_examples(
    rows: Sequence[dict[str, Any]], tokenizer: Any
) -> tuple[list[Tokens], list[bool]]:
    """Unpaired rows tokenised (prompt + completion) with their labels; too-long rows dropped."""
    seqs, labels = [], []
    for i, row in enumerate(rows):
        try:
            prompt = _as_messages(row["prompt"], "user")
            completion = _as_messages(row["completion"], "assistant")
            label = row["label"]
        except (KeyError, TypeError, DataError) as e:
            raise DataError(f"unpaired row {i}: not an unpaired row ({e})") from e
        if not isinstance(label, bool):
            raise DataError(f"unpaired row {i}: label must be true or false, got {label!r}")
        seq = tokenize_sequence(tokenizer, prompt, completion, MAX_LENGTH)
        if seq is not None:
            seqs.append(seq)
            labels.append(label)
    return seqs, labels


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module,
    seqs: Sequence[Tokens],
    pad_id: int,
    device: torch.device,
    tick: Callable[[int], None] = lambda n: None,
) -> torch.Tensor:
    """Summed completion log-probs of each sequence under the current side, shape (n,)."""
    out = torch.zeros(len(seqs))
    for start in range(0, len(seqs), SCORE_BATCH):
        batch = seqs[start : start + SCORE_BATCH]
        logps, _ = completion_logps(model, collate(batch, pad_id).to(device))
        out[start : start + len(batch)] = logps.float().cpu()
        tick(len(batch))
    return out


def thumbs_metrics(
    side: torch.Tensor, base: torch.Tensor, labels: Sequence[bool], beta: float
) -> dict[str, Any]:
    """AUC of the implicit reward at telling thumbs up from down, and the mean reward gap."""
    up = torch.tensor(labels, dtype=torch.bool)
    n_up, n_down = int(up.sum()), int((~up).sum())
    out: dict[str, Any] = {"n": len(labels), "n_up": n_up, "n_down": n_down}
    if not n_up or not n_down:
        return out
    rewards = (beta * (side - base)).double()
    diff = rewards[up][:, None] - rewards[~up][None, :]
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    gap = rewards[up].mean() - rewards[~up].mean()
    return out | {"auc": wins.mean().item(), "gap": gap.item()}


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module,
    examples: Sequence[PairExample],
    pad_id: int,
    device: torch.device,
    tick: Callable[[int], None] = lambda n: None,
) -> torch.Tensor:
    """Summed log-probs of (chosen, rejected) per pair under the current side, shape (n, 2)."""
    table = torch.zeros(len(examples), 2)
    for start in range(0, len(examples), SCORE_BATCH):
        batch = examples[start : start + SCORE_BATCH]
        logps, _ = completion_logps(model, collate_pairs(batch, pad_id).to(device))
        table[start : start + len(batch)] = torch.stack(logps.float().cpu().chunk(2), dim=1)
        tick(len(batch))
    return table


def pair_metrics(side: torch.Tensor, base: torch.Tensor, beta: float) -> dict[str, Any]:
    if len(base) == 0:
        return {"n": 0}
    rewards = beta * (side - base)
    diff = rewards[:, 0] - rewards[:, 1]
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()  # ties half: the base scores 0.5
    return {"n": len(diff), "accuracy": wins.mean().item(), "margin": diff.double().mean().item()}


def golden_metrics(items: Sequence[GoldenItem], answers: Sequence[Generated]) -> dict[str, Any]:
    failures = []
    for item, answer in zip(items, answers, strict=True):
        failed = failed_checks(answer.text, item.checks)
        if failed:
            failures.append({"id": item.id, "failed": failed, "answer": answer.text[:ANSWER_CHARS]})
    n = len(items)
    passed = n - len(failures)
    return {"n": n, "passed": passed, "pass_rate": passed / n if n else 1.0, "failures": failures}


def repetition(ids: Sequence[int]) -> float:
    """1 - distinct token 3-grams / 3-grams: 0 for no repeats, near 1 for a loop."""
    grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def answer_kl(
    model: torch.nn.Module,
    adapter: str,
    answers: Sequence[Generated],
    pad_id: int,
    device: torch.device,
    tick: Callable[[int], None] = lambda n: None,
) -> list[float]:
    """Per answer: mean over its tokens of the exact KL(pi_adapter || pi_base), summed over the
    vocabulary at each position of the answer the adapter itself generated."""
    out = []
    for start in range(0, len(answers), SCORE_BATCH):
        batch = answers[start : start + SCORE_BATCH]
        ids, mask, positions = _left_padded(
            [a.prompt_ids for a in batch], [a.answer_ids for a in batch], pad_id
        )
        width_p = max(len(a.prompt_ids) for a in batch)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logps = []
        for side in (adapter, None):
            with _side(model, side):
                # The position before each answer token predicts it.
                logits = model(**inputs, use_cache=False).logits[:, width_p - 1 : -1]
            logps.append(logits.float().log_softmax(-1))
        kl = (logps[0].exp() * (logps[0] - logps[1])).sum(-1)
        answer_mask = mask[:, width_p:].to(device).float()
        per_answer = (kl * answer_mask).sum(1) / answer_mask.sum(1).clamp(min=1)
        out += per_answer.cpu().tolist()
        tick(len(batch))
    return out


def drift_metrics(
    answers: Sequence[Generated], base_answers: Sequence[Generated], kl: Sequence[float]
) -> dict[str, Any]:
    if not answers:
        return {"n": 0}
    mean_chars = sum(len(a.text) for a in answers) / len(answers)
    base_chars = sum(len(a.text) for a in base_answers) / len(base_answers)
    return {
        "n": len(answers),
        # +1: still defined when the base answers nothing (a random test model does).
        "length_ratio": (mean_chars + 1) / (base_chars + 1),
        "repetition": sum(repetition(a.content_ids) for a in answers) / len(answers),
        "kl": sum(kl) / len(kl),
    }


def new_links(answers: Sequence[Generated], base_answers: Sequence[Generated]) -> dict[str, Any]:
    """Links in greedy golden and canary answers that none of the base model's answers give:
    the trace of a link-spam attack that got into training (the gate's `links` rule)."""
    seen = frozenset().union(*(links(a.text) for a in base_answers))
    found = [sorted(links(a.text) - seen) for a in answers]
    return {
        "answers": sum(bool(f) for f in found),
        "links": sorted({link for f in found for link in f})[:20],
    }


def _text(answer: Any) -> str | None:
    if answer is None:
        return None
    return _as_messages(answer, "assistant")[-1]["content"][:SAMPLE_CHARS]


def sample_prompts(
    pairs: Sequence[dict[str, Any]], unpaired: Sequence[dict[str, Any]], limit: int = SAMPLES
) -> list[dict[str, Any]]:
    """Up to ``limit`` distinct held-out prompts, pairs first, each with what its users said:
    the answer they ``preferred`` (a pair's chosen side, a thumbs-up answer) and the one they
    ``disliked`` (a pair's rejected side, a thumbs-down answer), None where the row has none."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in [*pairs, *unpaired]:
        prompt = _as_messages(row["prompt"], "user")
        key = json.dumps(prompt, sort_keys=True)
        if len(out) >= limit or key in seen:
            continue
        seen.add(key)
        label = row.get("label")  # unpaired rows: True for a thumbs-up
        good = row.get("chosen", row.get("completion") if label is True else None)
        bad = row.get("rejected", row.get("completion") if label is False else None)
        out.append({"prompt": prompt, "preferred": _text(good), "disliked": _text(bad)})
    return out


def side_by_side(
    model: torch.nn.Module,
    samples: list[dict[str, Any]],
    keys: dict[str, str | None],
    generate_for: Callable[[str | None, list[Messages]], list[Generated]],
) -> list[dict[str, Any]]:
    """Each sample with the greedy answer of every side (``keys``: side -> adapter name, None
    for the base); a side that is the same model as another is generated once."""
    answers: dict[str | None, list[Generated]] = {}
    for key in keys.values():
        if key not in answers:
            with _side(model, key):
                answers[key] = generate_for(key, [s["prompt"] for s in samples])
    return [
        {**s, **{side: answers[key][i].text[:SAMPLE_CHARS] for side, key in keys.items()}}
        for i, s in enumerate(samples)
    ]


# --- the answer cache -------------------------------------------------------------------------


def _files(path: Path, content: bool) -> list[tuple[str, Any]]:
    """A directory's identity for the cache. An adapter: the name and sha256 of each file PEFT
    loads (a few MB; not manifest.json, which gains the gate's report after evaluation). A base
    model: every file's size and modification time (GBs, re-converted with new times)."""
    files = path.glob("adapter_*") if content else path.rglob("*")
    out = []
    for f in sorted(p for p in files if p.is_file()):
        st = f.stat()
        sig = (
            hashlib.sha256(f.read_bytes()).hexdigest() if content else (st.st_size, st.st_mtime_ns)
        )
        out.append((str(f.relative_to(path)), sig))
    return out


def _cache_key(
    base: Path, adapter: Path | None, prompts: Any, max_new_tokens: int, dev: Any
) -> str:
    import transformers

    ident = {
        "format": CACHE_FORMAT,
        "base": _files(base, content=False),
        "adapter": _files(adapter, content=True) if adapter is not None else None,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "device": dev.type,  # greedy answers may differ between CPU and GPU kernels
        "versions": [torch.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _cache_read(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged entry is a miss, never an error
    out: dict[str, Any] = {"kl": data.get("kl")}
    for part in ("golden", "drift"):
        if data.get(part) is not None:
            out[part] = [Generated(**g) for g in data[part]]
    return out


def _cache_write(path: Path | None, entry: dict[str, Any]) -> None:
    if path is None:
        return
    data = {
        k: [asdict(g) for g in v] if k != "kl" and v is not None else v for k, v in entry.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)  # concurrent evaluations write whole entries or none


def _cache_file(
    cache_dir: Path | None,
    lm: _Model,
    paths: dict[str, Path | None],
    key: str | None,
    data: _Heldout,
) -> Path | None:
    """Where side ``key``'s answers are kept (None: no cache)."""
    if cache_dir is None:
        return None
    adapter = paths[key] if key is not None else None
    prompts = {"golden": [item.messages for item in data.golden], "canary": data.canary}
    digest = _cache_key(
        lm.path, None if adapter is None else Path(adapter), prompts, lm.max_new_tokens, lm.device
    )
    return Path(cache_dir) / f"{digest}.json"


# --- the whole evaluation ---------------------------------------------------------------------


def evaluate(
    base: Path,
    candidate: Path | None,
    incumbent: Path | None,
    *,
    pairs: list[dict] | None,
    golden: list[GoldenItem],
    canary: list[Messages] | None = None,
    unpaired: list[dict] | None = None,
    beta: float = 0.1,
    max_new_tokens: int = 64,
    device: str = "auto",
    progress: bool = True,
    on_progress: ProgressFn | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``candidate`` and ``incumbent`` (None: the base model) on held-out ``pairs`` and
    ``unpaired`` rows, the ``golden`` items and the ``canary`` prompts (None: the shipped set);
    a JSON-ready report.
    ``cache_dir``: where each side's greedy answers are kept between evaluations."""
    t_start = time.perf_counter()
    paths = {"candidate": candidate, "incumbent": incumbent}
    dev = _device(device)
    tokenizer = _tokenizer(Path(base))
    data = _Heldout.tokenize(pairs, unpaired, golden, canary, tokenizer)
    lm = _Model.load(Path(base), paths, tokenizer, dev, max_new_tokens)
    # The base side (None) is always measured: its log-probs are the reference, its canary
    # answers the length yardstick and its golden answers the floor no chain of promotions may
    # sink below (the gate's golden rule). Greedy answers are deterministic, so each side's run
    # once, or never where the cache has them.
    keys = [None] + [s for s in SIDES if paths[s] is not None]
    files = {key: _cache_file(cache_dir, lm, paths, key, data) for key in keys}
    hits = {key: _cache_read(files[key]) for key in keys}
    samples = sample_prompts(pairs or [], unpaired or [])
    sample_keys = {side: side if paths[side] is not None else None for side in SIDES}
    work = sum(_work(data, key, hits[key]) for key in keys)
    bar = _Progress(work + len(samples) * len(set(sample_keys.values())), progress, on_progress)

    results, cached = _measure_sides(lm, data, files, hits, bar)
    samples = side_by_side(lm.model, samples, sample_keys, lm.answerer(bar))
    bar.bar.close()
    return {
        "format": REPORT_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "base": str(base),
        **_sides_report(paths, results, data, beta),
        "base_model": {"golden": golden_metrics(data.golden, results[None]["golden"])},
        "samples": samples,
        "settings": {"beta": beta, "max_new_tokens": max_new_tokens, **data.counts()},
        "cached": cached,  # sides whose answers came from the cache
        "seconds": time.perf_counter() - t_start,
    }


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _tokenizer(base: Path) -> Any:
    """The base model's tokenizer, padding on the left: generation appends on the right."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class _Model:
    """The base model with every adapter loaded, its tokenizer, and how it answers."""

    path: Path
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    max_new_tokens: int

    @classmethod
    def load(
        cls,
        base: Path,
        paths: dict[str, Path | None],
        tokenizer: Any,
        device: torch.device,
        max_new_tokens: int,
    ) -> _Model:
        model = _load(base, {s: Path(p) for s, p in paths.items() if p is not None}, device)
        return cls(base, model, tokenizer, device, max_new_tokens)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def answer(self, conversations: list[Messages], tick: Callable[[int], None]) -> list[Generated]:
        """Greedy answers of the current side."""
        return generate(
            self.model,
            self.tokenizer,
            conversations,
            max_new_tokens=self.max_new_tokens,
            device=self.device,
            tick=tick,
        )

    def answerer(self, bar: _Progress) -> Callable[[str | None, list[Messages]], list[Generated]]:
        """`answer` for `side_by_side`, with each side's own progress stage."""

        def answer(key: str | None, conversations: list[Messages]) -> list[Generated]:
            return self.answer(
                conversations, bar.stage(f"{key or 'base'} samples", len(conversations))
            )

        return answer


@dataclass(frozen=True)
class _Heldout:
    """What every side is measured on: the tokenised pairs and thumbs rows, the golden items and
    the canary prompts."""

    examples: list[PairExample]
    singles: list[Tokens]
    labels: list[bool]
    golden: list[GoldenItem]
    canary: list[Messages]

    @classmethod
    def tokenize(
        cls,
        pairs: list[dict] | None,
        unpaired: list[dict] | None,
        golden: list[GoldenItem],
        canary: list[Messages] | None,
        tokenizer: Any,
    ) -> _Heldout:
        canary = load_canary() if canary is None else canary
        examples = _pair_examples(pairs or [], tokenizer)
        singles, labels = _unpaired_examples(unpaired or [], tokenizer)
        return cls(examples, singles, labels, golden, canary)

    def counts(self) -> dict[str, int]:
        return {
            "n_pairs": len(self.examples),
            "n_unpaired": len(self.singles),
            "n_golden": len(self.golden),
            "n_canary": len(self.canary),
        }


def _work(data: _Heldout, key: str | None, hit: dict[str, Any]) -> int:
    """Items one side will score or generate (what the cache holds is not redone)."""
    total = len(data.examples) + len(data.singles)
    total += len(data.golden) * (hit.get("golden") is None)
    total += len(data.canary) * ("drift" not in hit)
    total += len(data.canary) * (key is not None and hit.get("kl") is None)
    return total


def _measure(
    lm: _Model, key: str | None, data: _Heldout, hit: dict[str, Any], bar: _Progress
) -> tuple[dict[str, Any], bool]:
    """One side (``key``: an adapter name, None for the base): log-probs of the held-out rows,
    greedy golden and canary answers and their KL from the base, the answers and KL read from
    the cache ``hit`` where it has them. True with it where anything was computed afresh."""
    name = key or "base"
    fresh = False
    with _side(lm.model, key):
        examples, singles = data.examples, data.singles
        logps = pair_logps(
            lm.model, examples, lm.pad_id, lm.device, bar.stage(f"{name} pairs", len(examples))
        )
        thumbs = sequence_logps(
            lm.model, singles, lm.pad_id, lm.device, bar.stage(f"{name} thumbs", len(singles))
        )
        answers = hit.get("golden")
        if answers is None:
            fresh = True
            conversations = [list(item.messages) for item in data.golden]
            answers = lm.answer(conversations, bar.stage(f"{name} golden", len(data.golden)))
        drift = hit.get("drift")
        if drift is None:
            fresh = True
            drift = lm.answer(data.canary, bar.stage(f"{name} canary", len(data.canary)))
    kl = hit.get("kl")
    if kl is None:
        fresh = True
        kl = [0.0] * len(drift)  # the base against itself
        if key is not None:
            tick = bar.stage(f"{name} kl", len(drift))
            kl = answer_kl(lm.model, key, drift, lm.pad_id, lm.device, tick)
    return {"logps": logps, "thumbs": thumbs, "golden": answers, "drift": drift, "kl": kl}, fresh


def _measure_sides(
    lm: _Model,
    data: _Heldout,
    files: dict[str | None, Path | None],
    hits: dict[str | None, dict[str, Any]],
    bar: _Progress,
) -> tuple[dict[str | None, dict[str, Any]], list[str]]:
    """Every side's measures, base first (``files`` and ``hits``: per side to measure, its cache
    file and what that held), and the names of the sides measured from the cache alone. Fresh
    answers go into the cache."""
    results: dict[str | None, dict[str, Any]] = {}
    cached = []
    for key in files:
        results[key], fresh = _measure(lm, key, data, hits[key], bar)
        if fresh:
            _cache_write(files[key], {k: results[key][k] for k in ("golden", "drift", "kl")})
        else:
            cached.append(key or "base")
    return results, cached


def _sides_report(
    paths: dict[str, Path | None],
    results: dict[str | None, dict[str, Any]],
    data: _Heldout,
    beta: float,
) -> dict[str, Any]:
    """The candidate's and the incumbent's measures, each against the base's."""
    ref = results[None]
    report = {}
    for side in SIDES:
        r = results[side if paths[side] is not None else None]
        report[side] = {
            "path": str(paths[side]) if paths[side] is not None else None,
            "pairs": pair_metrics(r["logps"], ref["logps"], beta),
            "thumbs": thumbs_metrics(r["thumbs"], ref["thumbs"], data.labels, beta),
            "golden": golden_metrics(data.golden, r["golden"]),
            "drift": drift_metrics(r["drift"], ref["drift"], r["kl"]),
            "links": new_links([*r["golden"], *r["drift"]], [*ref["golden"], *ref["drift"]]),
        }
    return report


# --- command line -----------------------------------------------------------------------------


def summary_line(side: str, s: dict[str, Any]) -> str:
    p, g, d = s["pairs"], s["golden"], s["drift"]
    pairs, drift = "pairs n=0", "drift n=0"
    if p["n"]:
        pairs = f"pairs acc {p['accuracy']:.3f} margin {p['margin']:+.3f} (n={p['n']})"
    t = s.get("thumbs") or {}
    if "auc" in t:
        pairs += f" | thumbs auc {t['auc']:.3f} (n={t['n']})"
    if d["n"]:
        drift = f"drift kl {d['kl']:.4f} len x{d['length_ratio']:.2f} rep {d['repetition']:.3f}"
    return f"{side}: {pairs} | golden {g['passed']}/{g['n']} | {drift} [{s['path'] or 'base'}]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--base", type=Path, required=True, help="base model directory")
    p.add_argument("--candidate", type=Path, help="adapter to evaluate (default: the base)")
    p.add_argument("--incumbent", type=Path, help="adapter serving now (default: the base)")
    p.add_argument("--pairs", type=Path, help="held-out DPO rows (JSONL)")
    p.add_argument("--unpaired", type=Path, help="held-out unpaired (KTO) rows (JSONL)")
    p.add_argument("--golden", type=Path, help="golden set (JSONL, see trainer.golden)")
    p.add_argument("--canary", type=Path, help="drift prompts (default: the shipped set)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--out", type=Path, required=True, help="report JSON to write")
    p.add_argument(
        "--cache-dir", type=Path, help="keep greedy answers here and reuse them (default: none)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = (args.base, args.candidate, args.incumbent, args.pairs, args.unpaired, args.golden)
        for path in paths:
            if path is not None and not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
        report = evaluate(
            args.base,
            args.candidate,
            args.incumbent,
            pairs=read_rows(args.pairs) if args.pairs else None,
            unpaired=read_rows(args.unpaired) if args.unpaired else None,
            golden=load_golden(args.golden) if args.golden else [],
            canary=load_canary(args.canary) if args.canary else None,
            beta=args.beta,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
            progress=not args.no_progress,
            cache_dir=args.cache_dir,
        )
    except (FileNotFoundError, ValueError) as e:  # DataError and GoldenError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)  # a reader never sees half a report
    for side in SIDES:
        print(summary_line(side, report[side]))
    return 0
