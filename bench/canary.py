"""Live canary on simulated users: how often does it decide right, and how soon?

    .venv/bin/python bench/canary.py [--runs 400] [--effects -0.1 -0.05 0 0.05 0.1]
                                     [--answers-per-hour 100] [--share 0.5] [--margin 0]

Users arrive one after another; each asks a few questions in a row (geometric, mean
`--answers-per-user`) and is sticky to one arm (`adapters.canary.assign`). Each has a hidden
preference: the chance p_u that they like an incumbent answer, drawn from a Beta with mean
`--base` and concentration `--concentration` (2: uniform, very different people); a candidate
answer is liked with p_u + effect (clipped to [0, 1]). A liked answer gets a thumbs up with
chance `UP`, else nothing; a disliked one a thumbs down with chance `DOWN`, else a regeneration
with chance `REGEN`, else nothing. The candidate is truly better, equal or worse by `--effects`.

Every simulated hour the same stream is judged three ways, each until it decides:
- `mSPRT users`: `decide` with per-user sums (`combine`'s `Clusters`): cluster-robust V;
- `mSPRT plain`: `decide` with plain counts (binomial V, outcomes taken as independent);
- `peeking z`: a fixed two-sided 5% z-test looked at every hour (promote z > 1.96, roll back
  z < -1.96), the naive comparison.
Correct: promote a better candidate, roll back a worse one, anything but promote an equal one
(with `--margin` m > 0 an equal candidate should be promoted and one worse by m should not).
Times are over the runs that decided: outcomes per arm and simulated hours.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapters.canary import ArmStats, CanaryPolicy, Clusters, assign, decide  # noqa: E402
from bench import pct  # noqa: E402

UP, DOWN, REGEN = 0.25, 0.15, 0.35
METHODS = ("mSPRT users", "mSPRT plain", "peeking z")


@dataclass
class Arm:
    """Running counts of one arm, with the per-user sums kept up to date one answer at a time."""

    answers: int = 0
    up: int = 0
    down: int = 0
    regenerated: int = 0
    users: dict[str, tuple[int, int]] = field(default_factory=dict)
    sums: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # subjects, ss, sn, nn

    def add(self, user: str, signal: str | None) -> None:
        self.answers += 1
        if signal is None:
            return
        self.up += signal == "up"
        self.down += signal == "down"
        self.regenerated += signal == "regen"
        s, n = self.users.get(user, (0, 0))
        new = (s + (signal == "up"), n + 1)
        self.users[user] = new
        for (a, b), sign in (((s, n), -1), (new, 1)):
            self.sums[1] += sign * a * a
            self.sums[2] += sign * a * b
            self.sums[3] += sign * b * b
        self.sums[0] += n == 0

    def stats(self, clustered: bool) -> ArmStats:
        clusters = Clusters(*self.sums) if clustered else None
        return ArmStats(self.answers, self.up, self.down, self.regenerated, clusters)

    @property
    def outcomes(self) -> tuple[int, int]:
        return self.up, self.up + self.down + self.regenerated


def signal(rng: random.Random, liked: bool) -> str | None:
    """What one answer leaves behind: a thumbs, a regeneration, or nothing."""
    if liked:
        return "up" if rng.random() < UP else None
    if rng.random() < DOWN:
        return "down"
    return "regen" if rng.random() < REGEN else None


def peeking_z(cand: Arm, inc: Arm, policy: CanaryPolicy, hours: float) -> str:
    """The naive rule: a fixed-sample 5% two-sided z-test, looked at every hour."""
    (sc, nc), (si, ni) = cand.outcomes, inc.outcomes
    if min(nc, ni) < policy.min_outcomes:
        return "stop" if hours >= policy.max_hours else "continue"
    pc, pi = sc / nc, si / ni
    se = math.sqrt(max(pc * (1 - pc) / nc + pi * (1 - pi) / ni, 1e-12))
    z = (pc - pi + policy.margin) / se
    if z > 1.96:
        return "promote"
    if (pc - pi) / se < -1.96:
        return "rollback"
    full = min(nc, ni) >= policy.max_outcomes
    return "stop" if hours >= policy.max_hours or full else "continue"


def judge(method: str, arms: dict[bool, Arm], policy: CanaryPolicy, hours: float) -> str:
    if method == "peeking z":
        return peeking_z(arms[True], arms[False], policy, hours)
    clustered = method == "mSPRT users"
    stats = arms[True].stats(clustered), arms[False].stats(clustered)
    return decide(*stats, policy, elapsed_hours=hours).action


def experiment(effect: float, seed: int, args: argparse.Namespace, policy: CanaryPolicy) -> dict:
    """One canary; {method: (action, outcomes per arm, hours)} when each method finished."""
    rng = random.Random(seed)
    arms = {True: Arm(), False: Arm()}
    a, b = args.base * args.concentration, (1 - args.base) * args.concentration
    done: dict[str, tuple[str, int, float]] = {}
    left, user, hour = 0, 0, 0
    while len(done) < len(METHODS):
        hour += 1
        for _ in range(args.answers_per_hour):
            if left == 0:
                user += 1
                left = 1 + int(math.log(1 - rng.random()) / math.log(1 - 1 / args.answers_per_user))
                name = f"user-{user}"
                cand = assign(f"bench-{seed}", name, args.share)
                p = rng.betavariate(a, b) + (effect if cand else 0.0)
            left -= 1
            arms[cand].add(name, signal(rng, rng.random() < p))
        for method in METHODS:
            if method not in done:
                action = judge(method, arms, policy, float(hour))
                if action != "continue":
                    n = min(arms[True].outcomes[1], arms[False].outcomes[1])
                    done[method] = (action, n, float(hour))
    return done


def true_difference(effect: float, args: argparse.Namespace) -> float:
    """Candidate - incumbent rate on the test's own scale (thumbs up among signals), by Monte
    Carlo over 100,000 users with common random numbers, so that equal arms give exactly 0."""
    rng = random.Random(12345)
    a, b = args.base * args.concentration, (1 - args.base) * args.concentration
    ps = [rng.betavariate(a, b) for _ in range(100_000)]
    fail = DOWN + (1 - DOWN) * REGEN  # chance a disliked answer leaves a negative signal

    def rate(shift: float) -> float:
        liked = [min(1.0, max(0.0, p + shift)) for p in ps]
        good = sum(UP * q for q in liked)
        return good / (good + sum((1 - q) * fail for q in liked))

    return rate(effect) - rate(0.0)


def correct(action: str, d: float, margin: float) -> bool:
    """Better: promote. Equal: promote only with a margin. Worse but within the margin: either
    decision. Worse by the margin or more: roll back."""
    if abs(d) < 1e-9:
        return (action == "promote") == (margin > 0)
    if d > 0:
        return action == "promote"
    return action != "stop" if d > -margin else action == "rollback"


def row(effect: float, d: float, method: str, results: list, margin: float) -> str:
    """One line of the table: shares of each action, accuracy, times to decision."""
    runs = len(results)
    share = {a: sum(r[0] == a for r in results) / runs for a in ("promote", "rollback", "stop")}
    right = sum(correct(r[0], d, margin) for r in results) / runs
    decided = [r for r in results if r[0] != "stop"]
    ns, hs = [r[1] for r in decided], [r[2] for r in decided]
    times = (
        f"{statistics.median(ns):>7.0f} {pct(ns, 90):>6.0f} {statistics.median(hs):>6.0f} "
        f"{pct(hs, 90):>6.0f}"
        if decided
        else f"{'-':>7} {'-':>6} {'-':>6} {'-':>6}"
    )
    return (
        f"{effect:>+7.2f} {d:>+7.3f} {method:<12} {share['promote']:>6.1%} "
        f"{share['rollback']:>6.1%} {share['stop']:>6.1%} {right:>7.1%} {times}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="experiments per effect")
    parser.add_argument("--effects", type=float, nargs="+", default=[-0.1, -0.05, 0, 0.05, 0.1])
    parser.add_argument("--base", type=float, default=0.5, help="mean chance a user likes")
    parser.add_argument(
        "--concentration", type=float, default=2.0, help="Beta a+b: lower, more different users"
    )
    parser.add_argument("--answers-per-user", type=float, default=4.0)
    parser.add_argument("--answers-per-hour", type=int, default=100, help="segment traffic")
    parser.add_argument("--share", type=float, default=0.5, help="candidate's share of users")
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--max-outcomes", type=int, default=3000)
    parser.add_argument("--max-hours", type=float, default=168.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    policy = CanaryPolicy(
        margin=args.margin, max_outcomes=args.max_outcomes, max_hours=args.max_hours
    )
    lines = []
    for effect in args.effects:
        d = true_difference(effect, args)
        results: dict[str, list] = {m: [] for m in METHODS}
        for i in tqdm(range(args.runs), desc=f"effect {effect:+.2f}", leave=False):
            for method, result in experiment(effect, args.seed * 10**6 + i, args, policy).items():
                results[method].append(result)
        lines += [row(effect, d, m, results[m], args.margin) for m in METHODS]
    print(f"{args.runs} runs per effect, seed {args.seed}; {policy}")
    print(
        f"{args.answers_per_hour} answers/h, candidate share {args.share}, "
        f"{args.answers_per_user} answers/user, concentration {args.concentration}"
    )
    print(
        f"{'effect':>7} {'true d':>7} {'method':<12} {'promo':>6} {'rollb':>6} {'stop':>6} "
        f"{'correct':>7} {'med n':>7} {'p90 n':>6} {'med h':>6} {'p90 h':>6}"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
