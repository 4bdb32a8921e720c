"""The quality gate: which compiled pairs and KTO rows may train, and which are turned down.

`gate` runs over the items of one compile, pairs and KTO rows alike, in this order, counting
each drop under a `DropReason`:

1. keys already stored (`known_keys`) are skipped: a re-run adds nothing;
2. PII is redacted (`trainer.redact`) from prompts and answers;
3. content checks: the prompt ends with a user turn; no answer empty, too short or too long;
   the two sides of a pair not identical;
4. near-duplicate prompts (token-set Jaccard, per tenant): the newest few per cluster stay;
5. rater trust, when on: items weigh by their rater's trust, low-trust raters' items go;
6. caps: no user (and, when set, no API key) owns more than its share of the batch;
7. status: "pending" where an operator must approve, else "approved"; an item whose preferred
   answer has a link waits for an operator whatever the setting (`links`).

Items turned down from step 3 on come back as excluded (status "excluded"): the service stores
them, so their keys are known and a flood cut by the cap stays cut in later runs.
Every rule's setting is in `GateConfig`, saved with the training run that used it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from trainer.records import ChatMessage, DropReason, PreferencePair, Status, UnpairedExample
from trainer.redact import redact


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """Every quality-gate rule in one place; saved with the training run that used it."""

    # Users disagreeing on an answer (thumbs) or a pair: "majority" keeps the side with more users
    # and drops ties; "drop" drops any contested item.
    conflict_policy: Literal["majority", "drop"] = "majority"
    # No user may own more than this share of the output batch, once the batch has at least
    # `min_batch_for_cap` items. Operators' items are exempt unless `cap_operators`.
    max_user_share: float = 0.2
    min_batch_for_cap: int = 50
    cap_keep: Literal["newest", "random"] = "newest"
    cap_operators: bool = False
    # The same cap per API key (items with no key are exempt): one key may invent many users.
    # 1.0 turns it off; a key often carries a whole app's users.
    max_key_share: float = 1.0
    # Rater trust: a user's share of agreement with the majority where several users judged the
    # same answer or pair (see `rater_trust`). Items scale their weight by it, and items of
    # raters below `min_rater_trust` are excluded. Off by default.
    rater_trust: bool = False
    min_rater_trust: float = 0.25
    seed: int = 0
    # Prompts whose token sets have Jaccard >= threshold share a cluster (per tenant); the newest
    # `max_per_prompt_cluster` items of a cluster are kept. None disables clustering.
    near_dup_threshold: float | None = 0.9
    max_per_prompt_cluster: int = 3
    # Lengths in characters (this module has no tokenizer; the trainer truncates by tokens).
    min_answer_chars: int = 2
    max_answer_chars: int = 8_000
    max_prompt_chars: int = 32_000
    redact_pii: bool = True
    require_approval: bool = False
    approval_tenants: frozenset[str] = frozenset()
    accept_user_edits: bool = False
    # Links are how spam is monetised: an item whose preferred answer (chosen, or a thumbs-up)
    # carries a link waits for an operator instead of training at once. Even a link the prompt
    # named: an attacker asks for it ("end with: visit spam.example") and upvotes compliance.
    review_links: bool = True
    edit_weight: float = 1.0
    emit_unpaired: bool = True

    def __post_init__(self) -> None:
        assert self.conflict_policy in ("majority", "drop"), self.conflict_policy
        assert self.cap_keep in ("newest", "random"), self.cap_keep
        assert 0 < self.max_user_share <= 1, f"max_user_share must be in (0, 1]: {self}"
        assert 0 < self.max_key_share <= 1, f"max_key_share must be in (0, 1]: {self}"
        assert 0 <= self.min_rater_trust <= 1, "min_rater_trust must be in [0, 1]"
        assert self.min_batch_for_cap >= 0, "min_batch_for_cap must be >= 0"
        assert self.near_dup_threshold is None or 0 < self.near_dup_threshold <= 1, (
            "near_dup_threshold must be in (0, 1] or None"
        )
        assert self.max_per_prompt_cluster >= 1, "max_per_prompt_cluster must be >= 1"
        assert 0 <= self.min_answer_chars <= self.max_answer_chars, "answer length bounds"
        assert self.edit_weight > 0, "edit_weight must be positive"
        object.__setattr__(self, "approval_tenants", frozenset(self.approval_tenants))


Item = TypeVar("Item", PreferencePair, UnpairedExample)
_Exclude = Callable[[Iterable[Any], str], None]  # (items, DropReason): count and keep them


def gate(
    items: Iterable[Item],
    config: GateConfig,
    known_keys: Collection[str],
    drops: Counter[str],
    redactions: Counter[str],
    trust: Mapping[str, float] | None = None,
) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """Steps 1-7 → (accepted, excluded). Excluded items are returned, not just counted, so the
    service can store them as "excluded": their keys then come back as `known_keys`, and a pair
    the batch gates turned down (a flood over the user cap, a near-duplicate) stays down instead of
    slipping into the next batch once the ones that beat it are known."""
    excluded: list[Item] = []

    def exclude(xs: Iterable[Item], reason: str) -> None:
        for x in xs:
            drops[reason] += 1
            excluded.append(replace(x, status="excluded", excluded_reason=str(reason)))

    accepted = _new_and_clean(items, config, known_keys, drops, redactions, exclude)
    if config.near_dup_threshold is not None:
        accepted, near_dups = _cap_prompt_clusters(
            accepted, config.near_dup_threshold, config.max_per_prompt_cluster
        )
        exclude(near_dups, DropReason.NEAR_DUPLICATE_PROMPT)
    if trust is not None:
        accepted = _weighed_by_trust(accepted, trust, config, exclude)
    accepted = _capped(accepted, config, exclude)
    accepted = [replace(x, status=_status(x.tenant, config)) for x in accepted]
    if config.review_links:
        accepted = [_hold_links(x, drops) for x in accepted]

    def in_order(xs: list[Item]) -> tuple[Item, ...]:
        return tuple(sorted(xs, key=lambda x: (x.created_at, x.key)))

    return in_order(accepted), in_order(excluded)


# ---------------------------------------------------------------------------------------------
# Steps 1-3: new items, redacted, with sound content


def _new_and_clean(
    items: Iterable[Item],
    config: GateConfig,
    known_keys: Collection[str],
    drops: Counter[str],
    redactions: Counter[str],
    exclude: _Exclude,
) -> list[Item]:
    accepted: list[Item] = []
    for x in items:
        if x.key in known_keys:
            drops[DropReason.ALREADY_KNOWN] += 1
            continue
        if config.redact_pii:
            x = _redacted(x, redactions)
        problem = _content_problem(x, config)
        if problem is not None:
            exclude([x], problem)
        else:
            accepted.append(x)
    return accepted


def _answers_of(item: PreferencePair | UnpairedExample) -> tuple[str, ...]:
    if isinstance(item, PreferencePair):
        return (item.chosen, item.rejected)
    return (item.completion,)


def _redacted(item: Item, counts: Counter[str]) -> Item:
    def clean(text: str) -> str:
        new, found = redact(text)
        counts.update(found)
        return new

    prompt = tuple(ChatMessage(m.role, clean(m.content)) for m in item.prompt)
    if isinstance(item, PreferencePair):
        return replace(
            item, prompt=prompt, chosen=clean(item.chosen), rejected=clean(item.rejected)
        )
    return replace(item, prompt=prompt, completion=clean(item.completion))


def normalise_ws(text: str) -> str:
    """Runs of whitespace as one space: "a  b" and "a b " say the same."""
    return " ".join(text.split())


def _content_problem(item: PreferencePair | UnpairedExample, config: GateConfig) -> str | None:
    if not item.prompt or item.prompt[-1].role != "user":
        return DropReason.PROMPT_NOT_USER_LAST
    if sum(len(m.content) for m in item.prompt) > config.max_prompt_chars:
        return DropReason.PROMPT_TOO_LONG
    texts = [t.strip() for t in _answers_of(item)]
    if any(not t for t in texts):
        return DropReason.EMPTY
    if any(len(t) < config.min_answer_chars for t in texts):
        return DropReason.TOO_SHORT
    if any(len(t) > config.max_answer_chars for t in texts):
        return DropReason.TOO_LONG
    if isinstance(item, PreferencePair) and normalise_ws(item.chosen) == normalise_ws(
        item.rejected
    ):
        return DropReason.IDENTICAL
    return None


# ---------------------------------------------------------------------------------------------
# Step 4: near-duplicate prompts

_WORD_RE = re.compile(r"\w+")


def prompt_tokens(prompt: Sequence[ChatMessage]) -> frozenset[str]:
    """Lower-cased word set of the conversation's non-system turns.

    System messages are left out: a tenant's long fixed system prompt would otherwise make every
    conversation of that tenant look alike.
    """
    text = " ".join(m.content for m in prompt if m.role != "system")
    return frozenset(_WORD_RE.findall(text.casefold()))


def _prefix_len(size: int, threshold: float) -> int:
    # Prefix filtering (Bayardo et al., "Scaling up all pairs similarity search", 2007): two sets
    # with Jaccard >= t share a token among the first |s| - ceil(t*|s|) + 1 of each, under any
    # fixed global token order. Rare tokens first keeps candidate lists short.
    return size - math.ceil(threshold * size - 1e-9) + 1


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _newest_first(items: Iterable[Item]) -> list[Item]:
    return sorted(items, key=lambda x: (x.created_at, x.key), reverse=True)


def _cap_prompt_clusters(
    items: Sequence[Item], threshold: float, max_per_cluster: int
) -> tuple[list[Item], list[Item]]:
    """Greedy leader clustering per tenant, newest first: an item joins the most similar leader
    (Jaccard >= threshold) or leads a new cluster; each cluster keeps its first `max_per_cluster`
    items, i.e. the newest. Cost grows with how many leaders share a prompt's rarest tokens:
    about 1 s per 10k ordinary chat prompts; 8 s for 5k prompts of 30 words drawn uniformly from
    a 200-word vocabulary (a worst case: no rare words)."""
    tokens = {x.key: prompt_tokens(x.prompt) for x in items}
    freq = Counter(t for toks in tokens.values() for t in toks)

    def ordered(toks: frozenset[str]) -> list[str]:
        return sorted(toks, key=lambda t: (freq[t], t))

    kept: list[Item] = []
    dropped: list[Item] = []
    by_tenant: dict[str, list[Item]] = defaultdict(list)
    for x in items:
        by_tenant[x.tenant].append(x)
    for tenant in sorted(by_tenant):
        leaders: list[frozenset[str]] = []
        sizes: list[int] = []
        index: dict[str, list[int]] = defaultdict(list)  # prefix token → leader numbers
        for x in _newest_first(by_tenant[tenant]):
            toks = tokens[x.key]
            prefix = ordered(toks)[: _prefix_len(len(toks), threshold)] or [""]
            candidates = sorted({i for t in prefix for i in index.get(t, ())})
            scored = [(_jaccard(toks, leaders[i]), -i) for i in candidates]
            best = max((s for s in scored if s[0] >= threshold), default=None)
            if best is None:
                leaders.append(toks)
                sizes.append(0)
                for t in prefix:
                    index[t].append(len(leaders) - 1)
                cluster = len(leaders) - 1
            else:
                cluster = -best[1]
            if sizes[cluster] < max_per_cluster:
                sizes[cluster] += 1
                kept.append(x)
            else:
                dropped.append(x)
    return kept, dropped


# ---------------------------------------------------------------------------------------------
# Steps 5-6: rater trust and caps


def _weighed_by_trust(
    items: list[Item], trust: Mapping[str, float], config: GateConfig, exclude: _Exclude
) -> list[Item]:
    low = [x for x in items if trust.get(x.user_id, 1.0) < config.min_rater_trust]
    kept = [x for x in items if trust.get(x.user_id, 1.0) >= config.min_rater_trust]
    exclude(low, DropReason.LOW_TRUST)
    return [replace(x, weight=x.weight * trust.get(x.user_id, 1.0)) for x in kept]


def _capped(items: list[Item], config: GateConfig, exclude: _Exclude) -> list[Item]:
    """The per-user cap, and the per-key cap where one is set."""
    # Each cap shrinks the batch, which can push another group over its share: repeat until
    # a pass drops nothing, and then both hold (items only go, so this ends).
    while True:
        items, by_user = _cap_users(items, config)
        exclude(by_user, DropReason.USER_CAP)
        by_key: list[Item] = []
        if config.max_key_share < 1.0:
            items, by_key = _cap_users(
                items, config, group=lambda x: x.key_id, share=config.max_key_share
            )
            exclude(by_key, DropReason.KEY_CAP)
        if not by_user and not by_key:
            return items


def _user_cap(n_exempt: int, counts: Sequence[int], share: float) -> int:
    """Largest per-user count c with c <= share * (n_exempt + sum(min(n, c))).

    g(c) = share * (n_exempt + sum(min(n, c))) - c is concave with g(0) >= 0, so the feasible c
    form an interval [0, c*] and bisection finds c*. Capping at share * len(input) instead would
    not do: after dropping a flood, the flooder's share of the smaller batch is still too high.
    """
    lo, hi = 0, max(counts, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid <= share * (n_exempt + sum(min(n, mid) for n in counts)) + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cap_users(
    items: Sequence[Item],
    config: GateConfig,
    group: Callable[[Item], str] = lambda x: x.user_id,
    share: float | None = None,
) -> tuple[list[Item], list[Item]]:
    """No `group` (a user; or an API key) owns more than `share` of the kept items."""
    share = config.max_user_share if share is None else share
    if len(items) < config.min_batch_for_cap:
        return list(items), []

    def exempt(x: Item) -> bool:
        return (x.author_role == "operator" and not config.cap_operators) or not group(x)

    by_user: dict[str, list[Item]] = defaultdict(list)
    for x in items:
        if not exempt(x):
            by_user[group(x)].append(x)
    n_exempt = len(items) - sum(len(v) for v in by_user.values())
    cap = _user_cap(n_exempt, [len(v) for v in by_user.values()], share)

    def rank(xs: list[Item]) -> list[Item]:
        if config.cap_keep == "newest":
            return _newest_first(xs)
        # A seeded hash of the key: random-looking, yet independent of input order.
        return sorted(xs, key=lambda x: hashlib.sha256(f"{config.seed}:{x.key}".encode()).digest())

    dropped: set[str] = set()
    for xs in by_user.values():
        dropped.update(x.key for x in rank(xs)[cap:])
    return [x for x in items if x.key not in dropped], [x for x in items if x.key in dropped]


# ---------------------------------------------------------------------------------------------
# Step 7: status and links


def _status(tenant: str, config: GateConfig) -> Status:
    return "pending" if config.require_approval or tenant in config.approval_tenants else "approved"


_LINK_RE = re.compile(
    r"(?i)(?:\b(?:https?://|www\.)[^\s<>()\"']+"
    r"|\b(?:[a-z0-9-]+\.)+(?:com|net|org|info|biz|io|co|me|ru|cn|xyz|top|shop|site|online|"
    r"click|link|app|example)\b(?:/[^\s<>()\"']*)?)"
)


def links(text: str) -> frozenset[str]:
    """Links in a text (URLs, `www.` names, and bare domains under common top-level domains),
    lower-cased, without scheme, `www.` or trailing punctuation."""
    found = set()
    for m in _LINK_RE.finditer(text):
        link = re.sub(r"^(?:https?://)?(?:www\.)?", "", m.group(0).lower()).rstrip(".,;:!?")
        found.add(link.rstrip("/"))
    return frozenset(found)


def _hold_links(x: Item, drops: Counter[str]) -> Item:
    preferred = x.chosen if isinstance(x, PreferencePair) else (x.completion if x.label else "")
    found = links(preferred)
    if not found:
        return x
    drops[DropReason.HELD_LINK] += 1
    reason = f"{DropReason.HELD_LINK}: {', '.join(sorted(found))}"[:200]
    return replace(x, status="pending", excluded_reason=reason)
