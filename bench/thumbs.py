"""Thumbs-only visitors: each asks one question and rates the one answer it got, nothing more.

    .venv/bin/python bench/thumbs.py make-data            # once: writes tests/data/thumbs/
    .venv/bin/python bench/thumbs.py run [--seed 0] [--shuffle] [--recipe JSON]
    .venv/bin/python bench/thumbs.py study [--seeds 3]    # before / after / shuffled, per seed

Most feedback on a public page is a lone thumbs up or down on the only answer a visitor saw: no
regeneration, no pick, no edit. The visitors here are SmolLM2's own audience: each asks one of
the simulated users' training prompts (`bench.simulate.prompts`; several visitors may ask the
same one, as on a real site), gets one answer sampled as the service samples (temperature 0.7,
60 tokens), and rates it by a hidden preference kept out of the code under test: an answer
short enough to read at a glance (a finished answer of 40 to `UP_CHARS` characters) gets a
thumbs up, anything else a thumbs down; `NOISE` of the visitors rate carelessly (the opposite).

`run` compiles the events with the service's own compiler (`trainer.votes.compile_pairs`: lone
thumbs become KTO rows, an up and a down on the same prompt from different visitors become a
matched pair), trains the refresh recipe for a segment with thumbs, evaluates as a refresh does
(held-out thumbs by implied-reward AUC, the golden set, the shipped canary prompts), applies
the default gate, and measures greedy answers to held-out prompts on subjects no visitor asked
about. The effect is 1 - the held-out length ratio (adapter / base). The shuffled control
permutes the labels among the visitors (same number of ups and downs, no preference left).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.learning_gate import EVAL_CACHE, _model_dir, _sample  # noqa: E402
from bench.simulate import golden_items, prompts  # noqa: E402

DATA = ROOT / "tests" / "data" / "thumbs"
VISITORS = 300  # one chat and one thumbs each
POOL = 100  # distinct training prompts the visitors draw from
HELDOUT_ROWS = 60  # rated answers to the held-out prompts, for the gate's AUC
UP_CHARS = 160
NOISE = 0.1
START = datetime(2026, 11, 1, tzinfo=UTC)


def likes(text: str, finished: bool) -> bool:
    """The hidden preference: a finished answer short enough to read at a glance."""
    return finished and 40 <= len(text) < UP_CHARS


def _events(model: Any, tokenizer: Any, pool: list[str], n: int, seed: int, noise: float) -> list:
    rng = random.Random(seed)
    asked = [rng.randrange(len(pool)) for _ in range(n)]
    by_prompt: dict[int, list[int]] = {}
    for visitor, p in enumerate(asked):
        by_prompt.setdefault(p, []).append(visitor)
    rows: list[dict[str, Any] | None] = [None] * n
    for p, visitors in sorted(by_prompt.items()):
        answers = _sample(model, tokenizer, pool[p], len(visitors), seed * 10_000 + p)
        for visitor, (text, finished) in zip(visitors, answers, strict=True):
            label = likes(text, finished)
            careless = rng.random() < noise
            rows[visitor] = {
                "visitor": f"visitor-{seed}-{visitor}",
                "prompt": pool[p],
                "answer": text,
                "finished": finished,
                "label": label != careless,
                "minute": visitor * 7,  # a visitor every 7 minutes: 300 in about a day and a half
            }
    return rows


def make_data(model_dir: Path, out: Path = DATA) -> None:
    """Sample and rate the committed events (minutes on 2 cores; run once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.records import write_jsonl

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    train_prompts, held_prompts = prompts(0)
    with torch.no_grad():
        events = _events(model, tokenizer, train_prompts[:POOL], VISITORS, seed=1, noise=NOISE)
        held = _events(model, tokenizer, held_prompts, HELDOUT_ROWS, seed=2, noise=0.0)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(events, out / "events.jsonl")
    write_jsonl(held, out / "heldout.jsonl")
    (out / "heldout_prompts.json").write_text(json.dumps(held_prompts, indent=1) + "\n")
    ups = sum(e["label"] for e in events)
    print(f"{len(events)} events ({ups} up, {len(events) - ups} down), {len(held)} held-out rated "
          f"answers, {len(held_prompts)} held-out prompts in {out}")  # fmt: skip


# The refresh's recipe for a segment with thumbs, over `Settings().refresh_train`; see the study
# in docs/learning.md.
THUMBS_OVERRIDES: dict[str, Any] = {}


def compiled(events: list[dict[str, Any]], *, shuffle: bool, seed: int) -> list[Any]:
    """The visitors' chats and thumbs through the service's compiler (its default data-quality
    gate), as stored rows: pairs and lone-thumbs (KTO) rows. ``shuffle``: the labels permuted
    among the visitors (the control)."""
    from service.core.config import Settings
    from service.feedback import gate_config
    from trainer.records import Answer, Feedback
    from trainer.votes import compile_pairs

    labels = [e["label"] for e in events]
    if shuffle:
        random.Random(seed).shuffle(labels)
    answers, feedback = [], []
    for i, (e, label) in enumerate(zip(events, labels, strict=True)):
        at = START + timedelta(minutes=e["minute"])
        prompt = [{"role": "user", "content": e["prompt"]}]
        answers.append(Answer(
            message_id=f"m{i}", completion_id=f"c{i}", parent_id=f"p{i}", prompt=prompt,
            text=e["answer"], tenant="default", user_id=e["visitor"], created_at=at,
        ))  # fmt: skip
        feedback.append(Feedback(
            id=f"f{i}", message_id=f"m{i}", user_id=e["visitor"], kind="thumbs",
            created_at=at + timedelta(seconds=30), value=1 if label else -1,
        ))  # fmt: skip
    result = compile_pairs(answers, feedback, gate_config(Settings()))
    return [*result.pairs, *result.unpaired]


def _kto_row(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": e["prompt"]}],
        "completion": [{"role": "assistant", "content": e["answer"]}],
        "label": e["label"],
    }


def run_thumbs(
    model_dir: Path,
    work: Path,
    *,
    seed: int = 0,
    shuffle: bool = False,
    overrides: dict[str, Any] | None = None,
    data: Path = DATA,
    cache_dir: Path | None = None,
    golden: bool = True,
    progress: bool = False,
    events: int | None = None,
    match: bool = True,
) -> dict[str, Any]:
    """One refresh's training and gate on the committed events (the first ``events`` of them),
    and the held-out behaviour."""
    from adapters.gate import decide
    from service.core.config import Settings
    from service.loop.datasets import training_sets
    from trainer.data import read_rows
    from trainer.dpo import TrainConfig, train
    from trainer.evaluate import evaluate
    from trainer.records import write_jsonl

    settings = Settings() if match else Settings(refresh_match_window_hours=None)
    rows = read_rows(data / "events.jsonl")[:events]
    sets = training_sets(compiled(rows, shuffle=shuffle, seed=seed), settings)
    write_jsonl(sets.train, work / "train.jsonl")
    recipe = {**settings.refresh_train, **THUMBS_OVERRIDES, **(overrides or {}), "seed": seed}
    cfg = TrainConfig(**recipe)
    adapter = work / "adapter"
    result = train(cfg, pairs=work / "train.jsonl", base=model_dir, out=adapter,
                   progress_bar=progress)  # fmt: skip
    held_prompts = json.loads((data / "heldout_prompts.json").read_text())
    report = evaluate(
        model_dir,
        adapter,
        None,
        pairs=sets.heldout_pairs,
        unpaired=sets.heldout_unpaired,
        golden=golden_items() if golden else [],
        beta=cfg.beta,
        max_new_tokens=settings.eval_max_new_tokens,
        progress=progress,
        cache_dir=cache_dir,
    )  # as a refresh evaluates: the shipped canary prompts for drift
    cand = report["candidate"]
    verdict = decide(cand, report["incumbent"], settings.gate_for("default"),
                     base=report["base_model"])  # fmt: skip
    # Greedy answers to the held-out prompts as users get them, and rated answers to them
    # (the same hidden preference, no careless raters) scored by the implied reward.
    unseen = evaluate(
        model_dir, adapter, None, pairs=None, golden=[],
        canary=[[{"role": "user", "content": p}] for p in held_prompts],
        unpaired=[_kto_row(e) for e in read_rows(data / "heldout.jsonl")], beta=cfg.beta,
        max_new_tokens=settings.eval_max_new_tokens, progress=progress, cache_dir=cache_dir,
    )["candidate"]  # fmt: skip
    held = unseen["drift"]
    base_golden = report["base_model"]["golden"]
    return {
        "seed": seed,
        "shuffled": shuffle,
        "counts": sets.counts,
        "recipe": recipe,
        "approved": verdict.approved,
        "reasons": verdict.reasons,
        "length_ratio": held["length_ratio"],
        "effect": 1 - held["length_ratio"],
        "golden_loss": base_golden["pass_rate"] - cand["golden"]["pass_rate"] if golden else None,
        "kl": cand["drift"]["kl"],
        "gate_thumbs_auc": cand["thumbs"].get("auc"),
        "unseen_thumbs_auc": unseen["thumbs"].get("auc"),
        "train_seconds": result.metrics["seconds"]["total"],
        "kto_gap": result.metrics["train"].get("kto_gap"),
    }


def _row(r: dict[str, Any]) -> str:
    c = r["counts"]
    data = f"{c['matched']} matched + {c['thumbs_up']}/{c['thumbs_down']} up/down"
    golden = "-" if r["golden_loss"] is None else f"{r['golden_loss']:.3f}"
    gate = "approved" if r["approved"] else "rejected: " + "; ".join(r["reasons"])
    return (
        f"| {r['seed']} | {'shuffled' if r['shuffled'] else 'as rated'} | {data} | "
        f"{r['length_ratio']:.3f} | {r['effect']:+.1%} | {_auc(r['unseen_thumbs_auc'])} | "
        f"{_auc(r['gate_thumbs_auc'])} | {golden} | {r['kl']:.3f} | {gate} |"
    )


def _auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def study(seeds: int, overrides: dict[str, Any]) -> None:
    """Every seed as rated and with shuffled labels, one table row each as it finishes."""
    from service.core.config import Settings

    model_dir = _model_dir()
    print(f"recipe: {json.dumps({**Settings().refresh_train, **THUMBS_OVERRIDES, **overrides})}")
    print("| seed | labels | trained on | held-out length ratio | effect | AUC unseen | AUC gate "
          "| golden loss | KL | gate |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory(prefix="prefloop-thumbs-") as tmp:
        cache = Path(tmp) / "cache"
        for seed in range(seeds):
            for shuffle in (False, True):
                work = Path(tmp) / f"seed{seed}-{shuffle}"
                work.mkdir()
                r = run_thumbs(model_dir, work, seed=seed, shuffle=shuffle, overrides=overrides,
                               cache_dir=cache)  # fmt: skip
                print(_row(r), flush=True)
                results.append(r)
    for shuffle in (False, True):
        effect = [r["effect"] for r in results if r["shuffled"] == shuffle]
        print(f"{'shuffled' if shuffle else 'as rated'}: effect {statistics.mean(effect):+.1%} "
              f"(seeds: {', '.join(f'{e:+.1%}' for e in effect)})")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make-data", help="sample and rate the committed events (once)")
    run = sub.add_parser("run", help="one trainer seed (or the shuffled-label control)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--shuffle", action="store_true")
    run.add_argument("--recipe", default="{}", help="trainer options over the recipe, JSON")
    run.add_argument("--no-golden", action="store_true", help="skip the golden set (faster)")
    run.add_argument("--events", type=int, help="only the first N committed events")
    run.add_argument("--no-match", action="store_true", help="no matched pairs: KTO rows only")
    run.add_argument("--out", type=Path, help="also write the result here (JSON)")
    run.add_argument("--no-progress", action="store_true")
    st = sub.add_parser("study", help="every seed as rated and shuffled")
    st.add_argument("--seeds", type=int, default=3)
    st.add_argument("--recipe", default="{}", help="trainer options over the recipe, JSON")
    args = p.parse_args()
    if args.cmd == "study":
        study(args.seeds, json.loads(args.recipe))
    elif args.cmd == "make-data":
        make_data(_model_dir())
    elif args.cmd == "run":
        with tempfile.TemporaryDirectory(prefix="prefloop-thumbs-") as tmp:
            r = run_thumbs(
                _model_dir(), Path(tmp), seed=args.seed, shuffle=args.shuffle,
                overrides=json.loads(args.recipe), golden=not args.no_golden, events=args.events,
                match=not args.no_match,
                progress=not args.no_progress,
                cache_dir=EVAL_CACHE,
            )  # fmt: skip
        print(json.dumps(r, indent=1))
        if args.out:
            args.out.write_text(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
