"""Simulated users with a hidden preference, through the real HTTP API, then a refresh.

    .venv/bin/python bench/simulate.py --preference concise [--prompts 90] [--rounds 2]
    .venv/bin/python bench/simulate.py --preference signoff [--edits 40]
    .venv/bin/python bench/simulate.py --preference concise --thumbs-only [--visitors 300]

Users chat with the served model on varied prompts and judge its **own** samples (the on-policy
case the service lives in): they pick the better of two (`n=2`), or regenerate an answer and
rate the two versions up and down. An operator writes the ideal answer for some answers users
disliked. Then a refresh runs (`POST /v1/operator/runs`: compile, train, gate, promote), and the
harness measures, on held-out prompts the users never saw, how often the served model shows the
preferred behaviour, before and after, together with the golden set's pass rate.

With `--thumbs-only` the users are visitors of a public page instead: each asks one question
(drawn from 100 training prompts, so some are asked by several visitors) and rates the one
answer it got, thumbs up if it likes it (`Preference.likes`, a finished answer), else down, 10%
of them carelessly the other way; no pick, no regeneration, no edit. `--shuffle` is the control:
every visitor rates by a coin with the same odds of an up, whatever the answer.

The preference is a parameter (`Preference`): a hidden judge of two answers, the operator's
edit, and the behaviour measured on held-out answers. Two ship here: `CONCISE` (users prefer
the shorter answer; measured: mean answer length) and `SIGNOFF` (operators add the line
"— Acme Support", which the base model never writes; measured: share of answers that carry it).
`make bench-learn` runs both on the real SmolLM2 (docs/learning.md has the last results).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import study_signoff  # noqa: E402
from bench.study_signoff import SIGN_OFF  # noqa: E402
from trainer.golden import GoldenItem, failed_checks, parse_item  # noqa: E402

# The sign-off studies' subjects and short-answer questions, and more of each: the simulated
# users ask on more subjects than one study trains on.
SUBJECTS = [
    *study_signoff.SUBJECTS,
    "gardens", "mirrors", "candles", "forests", "islands", "lemons", "pianos", "castles",
    "storms", "wool", "penguins", "maple trees", "sailboats", "marbles", "pottery", "rainbows",
    "fireflies", "cheese", "lanterns", "glaciers", "pebbles", "otters",
]  # fmt: skip
# An answer cut at max_tokens cannot end with a sign-off, and users of a support bot mostly
# ask short things.
FORMS = [
    *study_signoff.FORMS,
    "Briefly, what is special about {}?",
    "Quick question: what are {} used for?",
]
# The operator's golden set: 113 short factual and safety items the base model knows reliably.
# The first 57 were screened from ~130 candidates, each answered greedily (60 tokens) and sampled
# 6 times at the service's temperature 0.7, and kept where the greedy answer passes for the right
# reason and at least 5 of the 6 samples pass; 56 more from 171 candidates at 7 of 8 samples.
# Items the base passes only by luck (3-5 of 8: "capital of France", "months in a year") flip
# under any LoRA update and measure noise, not forgetting. One item lost is 0.9 points, so the
# 2-point tolerance tells losing two items from losing three (at 57 items it could not).
GOLDEN_TOKENS = 64  # the gate's default eval_max_new_tokens
GOLDEN = [json.loads(line) for line in (ROOT / "trainer" / "golden.jsonl").read_text().splitlines()]


@dataclass(frozen=True)
class Preference:
    name: str
    # The hidden judge: which of two answers the user prefers (0 or 1), or None for no opinion.
    judge: Callable[[str, str], int | None]
    # Does one answer please the user (for thumbs on a single answer)?
    likes: Callable[[str], bool]
    # What an operator writes as the ideal answer instead of a disliked one.
    edit: Callable[[str], str] | None
    # The behaviour measured on held-out answers (higher or lower is better: `better`).
    measure: Callable[[list[str]], float]
    better: str  # "lower" | "higher"
    unit: str


# Shorter than this is no answer to these prompts ("The lanterns.", "Paper is used to make
# paper.", "Oh, that's a very important question!"): a user who wants brevity still wants an
# answer. Without this floor the users picked such fragments over real answers once the first
# refresh had made answers short, and the second refresh learnt to say nothing (golden 0.07,
# canary answers 0.14x the base's, rejected by the gate).
MIN_ANSWER_CHARS = 40


def _shorter(a: str, b: str) -> int | None:
    """The clearly shorter answer (at most 85% of the other's length) of two real answers; no
    opinion otherwise, as a person does not count characters. A fragment loses to an answer."""
    if min(len(a), len(b)) < MIN_ANSWER_CHARS:
        if max(len(a), len(b)) < MIN_ANSWER_CHARS:
            return None
        return 0 if len(a) >= MIN_ANSWER_CHARS else 1
    short, long = sorted((len(a), len(b)))
    if short > 0.85 * long:
        return None
    return 0 if len(a) < len(b) else 1


CONCISE = Preference(
    name="concise",
    judge=_shorter,
    likes=lambda a: MIN_ANSWER_CHARS <= len(a) < 120,
    edit=None,
    measure=lambda answers: statistics.mean(len(a) for a in answers),
    better="lower",
    unit="mean answer chars",
)


def _signed(a: str) -> bool:
    return a.rstrip().endswith(SIGN_OFF)


SIGNOFF = Preference(
    name="signoff",
    judge=lambda a, b: None if _signed(a) == _signed(b) else (0 if _signed(a) else 1),
    likes=_signed,
    edit=lambda a: a.rstrip() + "\n\n" + SIGN_OFF,
    measure=lambda answers: sum(_signed(a) for a in answers) / len(answers),
    better="higher",
    unit="share of answers signed off",
)
PREFERENCES = {p.name: p for p in (CONCISE, SIGNOFF)}


def prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): held-out subjects never appear in training."""
    rng = random.Random(seed)
    subjects = SUBJECTS[:]
    rng.shuffle(subjects)
    held, train = subjects[:10], subjects[10:]
    train_prompts = [f.format(s) for s in train for f in FORMS]
    rng.shuffle(train_prompts)
    held_prompts = [FORMS[i % len(FORMS)].format(s) for i, s in enumerate(held)]
    held_prompts += [FORMS[(i + 2) % len(FORMS)].format(s) for i, s in enumerate(held)]
    return train_prompts, held_prompts


@dataclass
class Client:
    """The service's HTTP API as the simulated users and the operator use it."""

    base_url: str
    model: str | None = None  # a segment name; None: the base model's name (`default`)
    max_tokens: int = 60
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base_url, timeout=600)

    def chat(self, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
        payload = {"messages": messages, "max_tokens": self.max_tokens, **body}
        if self.model:
            payload["model"] = self.model
        r = self.http.post("/v1/chat/completions", json=payload)
        r.raise_for_status()
        return r.json()

    def feedback(self, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
        r = self.http.post("/v1/feedback", json=body, headers=headers)
        r.raise_for_status()
        return r.json()

    def greedy(self, prompt: str, max_tokens: int | None = None) -> tuple[str, str | None]:
        messages = [{"role": "user", "content": prompt}]
        out = self.chat(messages, temperature=0, max_tokens=max_tokens or self.max_tokens)
        return out["choices"][0]["message"]["content"], out["adapter_version"]

    def wait_serving(self, version: str, timeout: float = 60) -> None:
        """Until answers come from ``version``: a promotion reaches the engine on its next
        registry poll, and answers measured before that would be the old model's."""
        deadline = time.monotonic() + timeout
        hi = [{"role": "user", "content": "Hi"}]
        while self.chat(hi, max_tokens=1, temperature=0)["adapter_version"] != version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{version} promoted but not served after {timeout} s")
            time.sleep(0.2)

    def refresh(self, segment: str, timeout: float = 3600) -> dict[str, Any]:
        r = self.http.post(
            "/v1/operator/runs", json={"segment": segment}, headers={"X-Operator": "sim"}
        )
        r.raise_for_status()
        run_id = r.json()["id"]
        deadline = time.monotonic() + timeout
        stage = None
        while time.monotonic() < deadline:
            run = self.http.get(f"/v1/operator/runs/{run_id}", headers={"X-Operator": "s"}).json()
            if run["stage"] != stage:
                stage = run["stage"]
                print(f"    refresh {run_id}: {stage or run['status']}", flush=True)
            if run["status"] not in ("queued", "running"):
                return run
            time.sleep(1.0)
        raise TimeoutError(f"refresh {run_id} still running after {timeout} s")


@dataclass
class Events:
    chats: int = 0
    picks: int = 0
    thumbs: int = 0
    regenerations: int = 0
    edits: int = 0

    @property
    def feedback(self) -> int:
        return self.picks + self.thumbs + self.edits


def simulate_users(
    client: Client,
    pref: Preference,
    train_prompts: list[str],
    *,
    users: int = 20,
    max_edits: int = 0,
    concurrency: int = 16,
    seed: int = 0,
) -> Events:
    """Each prompt is one user's conversation: two thirds pick between two sampled answers, one
    third regenerate and rate both versions. Disliked answers may get an operator edit. Answers
    are sampled with the service's defaults (temperature 0.7), as a user's client would."""
    events = Events()
    edits_left = [max_edits]
    rng = random.Random(seed)
    plan = [(i, p, rng.random() < 2 / 3) for i, p in enumerate(train_prompts)]

    def one(item: tuple[int, str, bool]) -> None:
        i, prompt, pick = item
        user = f"user-{i % users}"
        messages = [{"role": "user", "content": prompt}]
        if pick:
            out = client.chat(messages, n=2, user=user, seed=seed * 1000 + i)
            texts = [c["message"]["content"] for c in out["choices"]]
            events.chats += 1
            choice = pref.judge(texts[0], texts[1])
            if choice is not None:
                client.feedback(completion_id=out["id"], type="pick", chosen_index=choice)
                events.picks += 1
            finished = [c["finish_reason"] == "stop" for c in out["choices"]]
            disliked = [
                (out["id"], k, t) for k, t in enumerate(texts) if not pref.likes(t) and finished[k]
            ]
        else:
            first = client.chat(messages, user=user, seed=seed * 1000 + i)
            second = client.chat([], regenerate=first["id"], user=user, seed=seed * 1000 + i + 1)
            events.chats += 2
            events.regenerations += 1
            a = first["choices"][0]["message"]["content"]
            b = second["choices"][0]["message"]["content"]
            choice = pref.judge(a, b)
            if choice is not None:
                up, down = (first, second) if choice == 0 else (second, first)
                client.feedback(completion_id=up["id"], rating=1)
                client.feedback(completion_id=down["id"], rating=-1)
                events.thumbs += 2
            disliked = [
                (c["id"], 0, t)
                for c, t in ((first, a), (second, b))
                if not pref.likes(t) and c["choices"][0]["finish_reason"] == "stop"
            ]
        # The operator edits only answers that finished: one cut off at max_tokens needs a
        # rewrite, not a line added after half a sentence (that taught the model to sign off
        # mid-sentence, and then anywhere, even in place of the answer).
        if pref.edit is None:
            return
        for completion_id, index, text in disliked[:1]:
            if edits_left[0] <= 0:
                return
            edits_left[0] -= 1
            if not pick:
                client.feedback(completion_id=completion_id, rating=-1)
                events.thumbs += 1
            client.feedback(
                headers={"X-Operator": "ops"},
                completion_id=completion_id,
                type="edit",
                choice_index=index,
                text=pref.edit(text),
            )
            events.edits += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, plan))
    return events


def simulate_visitors(
    client: Client,
    pref: Preference,
    pool: list[str],
    *,
    visitors: int,
    noise: float = 0.1,
    shuffle: bool = False,
    concurrency: int = 16,
    seed: int = 0,
) -> Events:
    """Each visitor asks one question from ``pool`` and rates only the answer it got."""
    events = Events()
    rng = random.Random(seed)
    plan = [(i, rng.choice(pool), rng.random(), rng.random()) for i in range(visitors)]

    def one(item: tuple[int, str, float, float]) -> None:
        i, prompt, careless, coin = item
        out = client.chat([{"role": "user", "content": prompt}], user=f"visitor-{seed}-{i}",
                          seed=seed * 100_000 + i)  # fmt: skip
        choice = out["choices"][0]
        likes = choice["finish_reason"] == "stop" and pref.likes(choice["message"]["content"])
        up = coin < 0.4 if shuffle else likes != (careless < noise)
        client.feedback(completion_id=out["id"], rating=1 if up else -1,
                        user=f"visitor-{seed}-{i}")  # fmt: skip
        events.chats += 1
        events.thumbs += 1

    with ThreadPoolExecutor(concurrency) as pool_:
        list(pool_.map(one, plan))
    return events


@dataclass
class Measure:
    value: float
    golden_pass_rate: float
    versions: set[str | None]
    answers: list[str]


def measure(
    client: Client, pref: Preference, held_prompts: list[str], golden: list[GoldenItem]
) -> Measure:
    """Greedy answers to the held-out prompts and the golden set, as users get them now."""
    # 16 at a time: the held-out and golden answers decode together in the engine's batch.
    with ThreadPoolExecutor(16) as pool:
        held = list(pool.map(client.greedy, held_prompts))
        # At the gate's token budget (PREFLOOP_EVAL_MAX_NEW_TOKENS), so that an answer the
        # gate passed is not failed here for being cut 4 tokens earlier.
        gold = list(
            pool.map(lambda g: client.greedy(g.messages[-1]["content"], GOLDEN_TOKENS), golden)
        )
    answers = [a for a, _ in held]
    passed = sum(not failed_checks(a, g.checks) for (a, _), g in zip(gold, golden, strict=True))
    return Measure(
        value=pref.measure(answers),
        golden_pass_rate=passed / len(golden) if golden else 1.0,
        versions={v for _, v in held + gold},
        answers=answers,
    )


def golden_items() -> list[GoldenItem]:
    return [parse_item(g) for g in GOLDEN]


def run_rounds(
    client: Client,
    pref: Preference,
    segment: str,
    *,
    rounds: int,
    prompts_per_round: int,
    max_edits: int,
    seed: int = 0,
    before: Measure | None = None,
    log: Callable[[str], None] = print,
    visitors: int = 0,
    shuffle: bool = False,
) -> list[dict[str, Any]]:
    """Measure (or reuse ``before``: the same model's greedy answers, measured for another
    preference), then (simulate users, refresh, measure) ``rounds`` times; a dict per round."""
    train, held = prompts(seed)
    golden = golden_items()
    if before is None:
        before = measure(client, pref, held, golden)
    else:
        before = replace(before, value=pref.measure(before.answers))
    log(f"  before: {pref.unit} {before.value:.3f}, golden {before.golden_pass_rate:.2f}, "
        f"served by {sorted(map(str, before.versions))}")  # fmt: skip
    results = []
    for k in range(rounds):
        batch = train[k * prompts_per_round : (k + 1) * prompts_per_round]
        t0 = time.perf_counter()
        if visitors:  # thumbs only: visitors draw from the round's first 100 prompts
            events = simulate_visitors(client, pref, batch[:100], visitors=visitors,
                                       shuffle=shuffle, seed=seed + k)  # fmt: skip
        else:
            events = simulate_users(client, pref, batch, max_edits=max_edits, seed=seed + k)
        t_sim = time.perf_counter() - t0
        log(f"  round {k + 1}: {events.chats} chats, {events.feedback} feedback events "
            f"({events.picks} picks, {events.thumbs} thumbs, {events.edits} edits) in "
            f"{t_sim:.0f} s")  # fmt: skip
        run = client.refresh(segment)
        if run.get("outcome") == "promoted":
            client.wait_serving(run["candidate_version"])
        after = measure(client, pref, held, golden)
        steps = {s["name"]: s["seconds"] for s in run["steps"]}
        log(f"  round {k + 1}: refresh {run['status']} ({run['outcome']}), "
            f"{run['counts']}, steps {steps}")  # fmt: skip
        if run.get("verdict"):
            for check in run["verdict"]["checks"]:
                log(f"    [{'pass' if check['passed'] else 'FAIL'}] {check['detail']}")
        log(f"  after round {k + 1}: {pref.unit} {after.value:.3f} (before {before.value:.3f}), "
            f"golden {after.golden_pass_rate:.2f} (before {before.golden_pass_rate:.2f}), "
            f"served by {sorted(map(str, after.versions))}")  # fmt: skip
        results.append(
            {"events": events, "run": run, "before": before, "after": after, "sim_s": t_sim}
        )
        before = after
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preference", choices=sorted(PREFERENCES), default="concise")
    p.add_argument("--base-url", help="a running prefloop; default: start one here")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--prompts", type=int, default=90, help="training prompts per round")
    p.add_argument("--edits", type=int, default=40, help="most operator edits per round")
    p.add_argument("--thumbs-only", action="store_true", help="visitors who only rate")
    p.add_argument("--visitors", type=int, default=300, help="thumbs-only visitors per round")
    p.add_argument("--shuffle", action="store_true", help="thumbs-only control: coin ratings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train", default="{}", help='trainer options for the segment, JSON {"epochs": 3}'
    )
    p.add_argument(
        "--gate", default="{}", help='gate thresholds for the segment, JSON {"max_kl": 2.0}'
    )
    args = p.parse_args()
    pref = PREFERENCES[args.preference]
    segment = pref.name

    def go(base_url: str) -> None:
        client = Client(base_url, model=segment)
        print(f"preference {pref.name!r} on segment {segment!r} at {base_url}")
        results = run_rounds(
            client, pref, segment, rounds=args.rounds,
            prompts_per_round=max(args.prompts, 100) if args.thumbs_only else args.prompts,
            max_edits=args.edits if pref.edit else 0, seed=args.seed,
            visitors=args.visitors if args.thumbs_only else 0, shuffle=args.shuffle,
        )  # fmt: skip
        first, last = results[0]["before"], results[-1]["after"]
        change = (last.value - first.value) / first.value if first.value else float("inf")
        print(json.dumps({
            "preference": pref.name, "before": first.value, "after": last.value,
            "relative_change": change, "golden_before": first.golden_pass_rate,
            "golden_after": last.golden_pass_rate,
        }))  # fmt: skip

    if args.base_url:
        go(args.base_url)
        return 0
    import tempfile

    from tests.servers import serve_subprocess

    home = Path(tempfile.mkdtemp(prefix="prefloop-sim-"))  # the shipped golden set applies
    env = {
        "PREFLOOP_HOME": str(home),
        "PREFLOOP_SEGMENTS": json.dumps(["default", "concise", "signoff"]),
        "PREFLOOP_REFRESH_ENABLED": "false",
        "PREFLOOP_WATCH_INTERVAL_SECONDS": "0",
        "PREFLOOP_REFRESH_MIN_PAIRS": "8",
        "PREFLOOP_LOG_LEVEL": "warning",
        "PREFLOOP_MAX_BATCH": "32",  # 16 users, two answers each when they pick: 163 tok/s
        "PREFLOOP_REFRESH_TRAIN_SEGMENTS": json.dumps({segment: json.loads(args.train)}),
        "PREFLOOP_GATE_SEGMENTS": json.dumps({segment: json.loads(args.gate)}),
    }
    from service.core.config import Settings
    from service.engines.modelprep import prepare_default_model

    env["PREFLOOP_MODEL"] = str(prepare_default_model(Settings().models_dir))
    with serve_subprocess(env, home) as server:
        go(server.base_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
