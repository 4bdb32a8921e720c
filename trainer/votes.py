"""How feedback becomes votes, and votes become DPO pairs and KTO rows.

A thumbs-down, for example: `_resolve_thumbs` settles who said what about each answer (a
user's latest vote counts, users disagreeing go by majority). If a sibling answer — a
regeneration or another `n>1` choice of the same turn (same `parent_id`) — got a thumbs-up, the
two become a pair with the up as chosen (`_thumbs_votes`); if the user regenerated and kept the
new answer, the down-rated one is the rejected side of that pair (`_regenerate_votes`). A
thumbs-down in no pair becomes a KTO row (label False, `_unpaired`). When a refresh selects its
data, `match_thumbs` joins such lone rows into matched pairs: an up and a down on answers to the
same question from different conversations. The pairs and rows then pass the quality gate
(`trainer.quality.gate`); `compile_pairs`, below, runs the two in turn.

Signals (siblings = answers sharing `parent_id`, i.e. regenerations / `n>1` choices of one turn):

| signal                                           | chosen          | rejected             |
|--------------------------------------------------|-----------------|----------------------|
| regenerate, then keep (or thumbs-up) the new one | kept answer     | each earlier sibling |
| thumbs up on one sibling, down on another        | up              | down                 |
| A/B pick                                         | picked          | other                |
| operator edit                                    | operator's text | the edited answer    |
| thumbs on an answer in no pair above             | KTO row (prompt, completion, label)    |

Steps (`pairs_and_rows`), each drop counted under a `DropReason`:

1. `_resolve_thumbs`: per (user, answer) the latest thumbs vote wins; across users the majority
   wins (ties dropped), or any disagreement drops the answer's votes (`conflict_policy="drop"`).
2. `_regenerate_votes`, `_thumbs_votes`, `_pick_votes`, `_edit_pairs`: signals → candidate votes.
3. `_settle`: per unordered message pair, a user's latest direction wins; users are counted per
   direction as in step 1; votes agreeing on the winning direction merge into one pair.
4. `_pair_from_vote`, `_unpaired`: settled votes → pairs, thumbs in no pair → KTO rows, each
   under its content key (`trainer.records.dpo_pair_key` & co.).

Drop counts are in the unit dropped at that step: feedback rows in step 1, candidate votes in
step 3. `rater_trust` scores each user's agreement with the majority, for the gate.

`compile_pairs` is the compiler's entry point. Pure Python (no torch, no `service` import),
deterministic and independent of input order: the same data always yields the same pairs under
the same `key`s. Its recipe:

1. index the answers and feedback; invalid feedback and feedback on unknown answers is dropped;
2. `trainer.votes.pairs_and_rows`: thumbs, regenerations, picks and edits → votes → pairs, and
   thumbs in no pair → KTO rows;
3. `trainer.votes.rater_trust`, when the gate weighs items by it;
4. `trainer.quality.gate`, on the pairs and on the KTO rows: known keys skipped, PII redacted,
   content checks, near-duplicate prompts, rater trust, per-user and per-key caps, approval
   status and links.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from trainer.quality import GateConfig, gate, normalise_ws
from trainer.records import (
    Answer,
    ChatMessage,
    CompileResult,
    DropReason,
    Feedback,
    PreferencePair,
    Role,
    Source,
    UnpairedExample,
    dpo_pair_key,
    edit_pair_key,
    kto_key,
    matched_pair_key,
)

# When several signals agree on the same (chosen, rejected) message pair, the merged pair is
# labelled with the most explicit one: an A/B pick was asked for, a regeneration is inferred.
_SOURCE_PRIORITY: dict[str, int] = {"pick": 0, "thumbs": 1, "regenerate": 2, "matched": 3}


@dataclass(frozen=True)
class _Voter:
    """Who stands behind a vote, and when."""

    user_id: str
    at: datetime
    role: Role
    feedback_id: str | None  # None for implicit signals (a kept answer)
    key_id: str = ""


@dataclass(frozen=True)
class _Label:
    """An answer's settled thumbs: the winning side and the users on it."""

    value: int  # +1 / -1
    voters: tuple[_Voter, ...]


@dataclass(frozen=True)
class _Vote:
    """One signal saying `chosen_id` beats `rejected_id`."""

    source: Source
    chosen_id: str
    rejected_id: str
    voters: tuple[_Voter, ...]


def pairs_and_rows(
    answers: Mapping[str, Answer],
    feedback: Mapping[str, Sequence[Feedback]],
    config: GateConfig,
    drops: Counter[str],
) -> tuple[list[PreferencePair], list[UnpairedExample]]:
    """Steps 1-4: (DPO pairs, KTO rows) before the quality gate. `answers` by message id;
    `feedback` the valid rows on known answers by kind ("thumbs", "pick", "edit"), oldest first."""
    labels = _resolve_thumbs(feedback.get("thumbs", ()), config.conflict_policy, drops)
    siblings = _siblings(answers)
    votes = (
        _regenerate_votes(siblings, labels)
        + _thumbs_votes(siblings, labels)
        + _pick_votes(feedback.get("pick", ()), answers, drops)
    )
    edits = _edit_pairs(feedback.get("edit", ()), answers, config, drops)
    # An answer in any candidate pair (even one dropped as contested) is not "lone": its thumbs
    # already spoke in a pair, and a KTO row would count the same vote twice.
    paired = {m for v in votes for m in (v.chosen_id, v.rejected_id)}
    paired |= {e.rejected_message_id for e in edits}
    pairs = [
        p
        for v in _settle(votes, config.conflict_policy, drops)
        if (p := _pair_from_vote(v, answers, drops)) is not None
    ] + edits
    unpaired = _unpaired(labels, answers, paired) if config.emit_unpaired else []
    return pairs, unpaired


# ---------------------------------------------------------------------------------------------
# Step 1: thumbs labels per answer


def _latest_per(rows: Sequence[Feedback], key: Any, drops: Counter[str]) -> list[Feedback]:
    """Keep each key's latest row (rows must be sorted by time); count the rest as superseded."""
    latest: dict[Any, Feedback] = {}
    for row in rows:
        if key(row) in latest:
            drops[DropReason.SUPERSEDED_VOTE] += 1
        latest[key(row)] = row
    return list(latest.values())


def _decide(
    users: Mapping[Any, int], units: Mapping[Any, int], policy: str, drops: Counter[str]
) -> Any:
    """The side backed by more distinct users, or None when contested without a majority (or
    contested at all under policy "drop"). Drops are counted in `units` (rows or votes)."""
    live = [side for side in users if users[side] > 0]
    if len(live) <= 1:
        return live[0] if live else None
    ranked = sorted(live, key=lambda side: -users[side])
    if policy == "drop" or users[ranked[0]] == users[ranked[1]]:
        drops[DropReason.CONFLICTING_VOTES] += sum(units[side] for side in live)
        return None
    drops[DropReason.OUTVOTED] += sum(units[side] for side in ranked[1:])
    return ranked[0]


def _resolve_thumbs(
    thumbs: Sequence[Feedback], policy: str, drops: Counter[str]
) -> dict[str, _Label]:
    latest = _latest_per(thumbs, lambda f: (f.user_id, f.message_id), drops)
    camps: dict[str, dict[int, list[_Voter]]] = defaultdict(lambda: {1: [], -1: []})
    for f in latest:
        camps[f.message_id][f.value].append(
            _Voter(f.user_id, f.created_at, f.author_role, f.id, f.key_id)
        )
    labels = {}
    for message_id, sides in camps.items():
        sizes = {side: len(voters) for side, voters in sides.items()}  # one row per user here
        winner = _decide(sizes, sizes, policy, drops)
        if winner is not None:
            labels[message_id] = _Label(winner, tuple(sides[winner]))
    return labels


# ---------------------------------------------------------------------------------------------
# Step 2: signals → candidate votes


def _siblings(answers: Mapping[str, Answer]) -> dict[str, list[Answer]]:
    groups: dict[str, list[Answer]] = defaultdict(list)
    for a in answers.values():
        groups[a.parent_id].append(a)
    return groups


def _regenerate_votes(
    siblings: Mapping[str, list[Answer]], labels: Mapping[str, _Label]
) -> list[_Vote]:
    """A kept answer (or a regeneration rated up) beats each earlier sibling the user left."""

    def keeper_voters(a: Answer) -> tuple[_Voter, ...]:
        voters: tuple[_Voter, ...] = ()
        if a.kept:
            voters += (_Voter(a.user_id, a.created_at, "user", None, a.key_id),)
        label = labels.get(a.message_id)
        if a.regenerated_from is not None and label is not None and label.value > 0:
            voters += label.voters
        return voters

    votes = []
    for group in siblings.values():
        keepers = {a.message_id: keeper_voters(a) for a in group}
        for kept in group:
            if not keepers[kept.message_id]:
                continue
            for earlier in group:
                if (
                    earlier.created_at < kept.created_at
                    and earlier.completion_id != kept.completion_id
                    and not keepers[earlier.message_id]  # also kept: the user wanted both
                    and getattr(labels.get(earlier.message_id), "value", 0) <= 0
                ):
                    votes.append(
                        _Vote(
                            "regenerate",
                            kept.message_id,
                            earlier.message_id,
                            keepers[kept.message_id],
                        )
                    )
    return votes


def _thumbs_votes(
    siblings: Mapping[str, list[Answer]], labels: Mapping[str, _Label]
) -> list[_Vote]:
    votes = []
    for group in siblings.values():
        rated = [a for a in group if a.message_id in labels]
        ups = [a for a in rated if labels[a.message_id].value > 0]
        downs = [a for a in rated if labels[a.message_id].value < 0]
        for up in ups:
            for down in downs:
                voters = labels[up.message_id].voters + labels[down.message_id].voters
                votes.append(_Vote("thumbs", up.message_id, down.message_id, voters))
    return votes


def _pick_votes(
    picks: Sequence[Feedback], answers: Mapping[str, Answer], drops: Counter[str]
) -> list[_Vote]:
    latest = _latest_per(
        picks, lambda f: (f.user_id, frozenset((f.message_id, f.other_message_id))), drops
    )
    votes = []
    for f in latest:
        assert f.other_message_id is not None  # filtered as invalid before
        if f.other_message_id not in answers:
            drops[DropReason.UNKNOWN_MESSAGE] += 1
        elif answers[f.message_id].parent_id != answers[f.other_message_id].parent_id:
            drops[DropReason.NOT_SIBLINGS] += 1
        else:
            voter = _Voter(f.user_id, f.created_at, f.author_role, f.id, f.key_id)
            votes.append(_Vote("pick", f.message_id, f.other_message_id, (voter,)))
    return votes


# ---------------------------------------------------------------------------------------------
# Step 3: settle votes per message pair


def _settle(votes: Sequence[_Vote], policy: str, drops: Counter[str]) -> list[_Vote]:
    """One vote per unordered message pair, or none if contested without a majority."""
    by_pair: dict[tuple[str, str], list[_Vote]] = defaultdict(list)
    for v in votes:
        by_pair[tuple(sorted((v.chosen_id, v.rejected_id)))].append(v)  # type: ignore[arg-type]

    settled = []
    for (a, b), group in sorted(by_pair.items()):
        # A user's latest direction counts; their older opposite votes are superseded. (Equal
        # times compare the direction's id, only so the outcome never depends on input order.)
        latest: dict[str, tuple[datetime, str]] = {}
        for v in group:
            for voter in v.voters:
                mine = (voter.at, v.chosen_id)
                latest[voter.user_id] = max(latest.get(voter.user_id, mine), mine)
        camps: dict[str, list[_Voter]] = {a: [], b: []}
        for v in group:
            camps[v.chosen_id].extend(x for x in v.voters if latest[x.user_id][1] == v.chosen_id)
        n_votes = {d: sum(v.chosen_id == d for v in group) for d in (a, b)}
        users = {d: len({x.user_id for x in camps[d]}) for d in (a, b)}
        for d in (a, b):
            if n_votes[d] and not users[d]:  # all its voters later voted the other way
                drops[DropReason.SUPERSEDED_VOTE] += n_votes[d]
        winner = _decide(users, n_votes, policy, drops)
        if winner is None:
            continue
        agreeing = [v for v in group if v.chosen_id == winner]
        drops[DropReason.DUPLICATE_PAIR] += len(agreeing) - 1
        source = min((v.source for v in agreeing), key=_SOURCE_PRIORITY.__getitem__)
        voters = tuple(sorted(set(camps[winner]), key=lambda x: (x.at, x.user_id)))
        loser = b if winner == a else a
        settled.append(_Vote(source, winner, loser, voters))
    return settled


# ---------------------------------------------------------------------------------------------
# Step 4: materialise pairs and KTO rows


def _same_conversation(a: Answer, b: Answer) -> bool:
    # System prompts may be regenerated per request (dates, tenant notes); the turns must match.
    def turns(x: Answer) -> tuple[ChatMessage, ...]:
        return tuple(m for m in x.prompt if m.role != "system")

    return turns(a) == turns(b)


def _attribution(voters: Sequence[_Voter]) -> _Voter:
    """The item belongs to the newest voter behind it (ties: smallest user id, then row id)."""
    newest = max(v.at for v in voters)
    return min(
        (v for v in voters if v.at == newest), key=lambda v: (v.user_id, v.feedback_id or "")
    )


def _pair_from_vote(
    vote: _Vote, answers: Mapping[str, Answer], drops: Counter[str]
) -> PreferencePair | None:
    chosen, rejected = answers[vote.chosen_id], answers[vote.rejected_id]
    if not _same_conversation(chosen, rejected):
        drops[DropReason.PROMPT_MISMATCH] += 1
        return None
    who = _attribution(vote.voters)
    return PreferencePair(
        key=dpo_pair_key(chosen.message_id, rejected.message_id),
        source=vote.source,
        prompt=chosen.prompt,
        chosen=chosen.text,
        rejected=rejected.text,
        weight=1.0,
        status="approved",
        tenant=chosen.tenant,
        segment=chosen.segment,
        user_id=who.user_id,
        key_id=who.key_id,
        author_role=who.role,
        created_at=who.at,
        chosen_message_id=chosen.message_id,
        rejected_message_id=rejected.message_id,
        chosen_completion_id=chosen.completion_id,
        rejected_completion_id=rejected.completion_id,
        chosen_adapter_version=chosen.adapter_version,
        rejected_adapter_version=rejected.adapter_version,
        chosen_sampling=chosen.sampling,
        rejected_sampling=rejected.sampling,
        feedback_ids=tuple(sorted({x.feedback_id for x in vote.voters if x.feedback_id})),
    )


def _edit_pairs(
    edits: Sequence[Feedback],
    answers: Mapping[str, Answer],
    config: GateConfig,
    drops: Counter[str],
) -> list[PreferencePair]:
    pairs: dict[str, PreferencePair] = {}
    for f in _latest_per(edits, lambda f: (f.user_id, f.message_id), drops):
        if f.author_role != "operator" and not config.accept_user_edits:
            drops[DropReason.EDIT_NOT_OPERATOR] += 1
            continue
        original = answers[f.message_id]
        assert f.text is not None  # filtered as invalid before
        key = edit_pair_key(original.message_id, f.text)
        if key in pairs:  # two operators wrote the same text
            drops[DropReason.DUPLICATE_PAIR] += 1
            continue
        pairs[key] = PreferencePair(
            key=key,
            source="edit",
            prompt=original.prompt,
            chosen=f.text,
            rejected=original.text,
            weight=config.edit_weight,
            status="approved",
            tenant=original.tenant,
            segment=original.segment,
            user_id=f.user_id,
            key_id=f.key_id,
            author_role=f.author_role,
            created_at=f.created_at,
            chosen_message_id=None,
            rejected_message_id=original.message_id,
            chosen_completion_id=None,
            rejected_completion_id=original.completion_id,
            chosen_adapter_version=None,
            rejected_adapter_version=original.adapter_version,
            rejected_sampling=original.sampling,
            feedback_ids=(f.id,),
        )
    return list(pairs.values())


def _unpaired(
    labels: Mapping[str, _Label], answers: Mapping[str, Answer], paired: Collection[str]
) -> list[UnpairedExample]:
    rows = []
    for message_id, label in labels.items():
        if message_id in paired:
            continue
        a, who = answers[message_id], _attribution(label.voters)
        rows.append(
            UnpairedExample(
                key=kto_key(message_id, label.value > 0),
                prompt=a.prompt,
                completion=a.text,
                label=label.value > 0,
                weight=1.0,
                status="approved",
                tenant=a.tenant,
                segment=a.segment,
                user_id=who.user_id,
                key_id=who.key_id,
                author_role=who.role,
                created_at=who.at,
                message_id=a.message_id,
                completion_id=a.completion_id,
                adapter_version=a.adapter_version,
                sampling=a.sampling,
                feedback_ids=tuple(sorted(v.feedback_id for v in label.voters if v.feedback_id)),
                parent_id=a.parent_id,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Rater trust


def rater_trust(thumbs: Sequence[Feedback], picks: Sequence[Feedback]) -> dict[str, float]:
    """Each user's agreement with the consensus, (1 + agreed) / (1 + judged), over the items
    several users judged: an answer with thumbs from two or more users, or a pair of answers
    picked between by two or more. The consensus is the side more users took (ties: no
    consensus, the item does not count). A user who never judged a contested item has trust 1;
    one who sided against the majority on every one of n contested items, 1 / (1 + n).
    Operators are trusted (they are not in the result). Each user's latest vote counts."""
    by_item: dict[Any, dict[str, Any]] = defaultdict(dict)
    for f in sorted(thumbs, key=lambda f: (f.created_at, f.id)):
        if f.author_role == "user":
            by_item[("thumbs", f.message_id)][f.user_id] = f.value
    for f in sorted(picks, key=lambda f: (f.created_at, f.id)):
        if f.author_role == "user" and f.other_message_id is not None:
            pair = ("pick", *sorted((f.message_id, f.other_message_id)))
            by_item[pair][f.user_id] = f.message_id
    agreed: Counter[str] = Counter()
    judged: Counter[str] = Counter()
    for votes in by_item.values():
        if len(votes) < 2:
            continue
        sides = Counter(votes.values()).most_common()
        if len(sides) > 1 and sides[0][1] == sides[1][1]:
            continue  # a tie: no consensus
        majority = sides[0][0]
        for user, side in votes.items():
            judged[user] += 1
            agreed[user] += side == majority
    return {u: (1 + agreed[u]) / (1 + judged[u]) for u in judged}


# ---------------------------------------------------------------------------------------------
# Matched pairs from lone thumbs


def _question(x: UnpairedExample) -> tuple[str, ...]:
    """What makes two answers comparable: scope, adapter version and the whole conversation
    before them, system prompt included, compared case- and whitespace-insensitively."""
    turns = tuple(f"{m.role}:{normalise_ws(m.content).casefold()}" for m in x.prompt)
    return (x.tenant, x.segment, x.adapter_version, *turns)


def _matchable(up: UnpairedExample, down: UnpairedExample, window_hours: float) -> bool:
    return (
        up.completion_id != down.completion_id  # two choices of one completion: one visitor
        and not (up.parent_id and up.parent_id == down.parent_id)  # one conversation's turn
        and up.user_id != down.user_id  # one user rating both compared nothing
        and abs((up.created_at - down.created_at).total_seconds()) <= window_hours * 3600
        and normalise_ws(up.completion) != normalise_ws(down.completion)
    )


def match_thumbs(
    rows: Sequence[UnpairedExample], window_hours: float | None
) -> tuple[list[PreferencePair], list[UnpairedExample]]:
    """Lone thumbs → (matched pairs, the rows left unpaired).

    An up and a down become a pair (source "matched", chosen = the up) when they answer the same
    question: same tenant, segment and adapter version (both answers came from one policy), and
    the same conversation before the answer, system prompt included, compared case- and
    whitespace-insensitively; from different conversations (a regenerated or `n>1` sibling is
    the compiler's business), rated by different users, at most `window_hours` apart, with
    different texts. Each row joins at most one pair, the nearest in time first (ties by key, so
    the result does not depend on input order). The pair keeps both rows' feedback ids and
    weighs the smaller of their weights. `window_hours` None: no matching.
    """
    if window_hours is None:
        return [], list(rows)
    groups: dict[tuple[str, ...], list[UnpairedExample]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.key):
        groups[_question(r)].append(r)
    pairs: list[PreferencePair] = []
    used: set[str] = set()
    for members in groups.values():
        ups = [r for r in members if r.label]
        downs = [r for r in members if not r.label]
        candidates = sorted(
            (abs((u.created_at - d.created_at).total_seconds()), u.key, d.key, u, d)
            for u in ups
            for d in downs
            if _matchable(u, d, window_hours)
        )
        for _, _, _, up, down in candidates:
            if up.key not in used and down.key not in used:
                used |= {up.key, down.key}
                pairs.append(_matched_pair(up, down))
    return pairs, [r for r in rows if r.key not in used]


def _matched_pair(up: UnpairedExample, down: UnpairedExample) -> PreferencePair:
    newest = max(up, down, key=lambda r: (r.created_at, r.key))
    return PreferencePair(
        key=matched_pair_key(up.key, down.key),
        source="matched",
        prompt=up.prompt,
        chosen=up.completion,
        rejected=down.completion,
        weight=min(up.weight, down.weight),
        status=newest.status,
        tenant=up.tenant,
        segment=up.segment,
        user_id=newest.user_id,
        key_id=newest.key_id,
        author_role=newest.author_role,
        created_at=newest.created_at,
        chosen_message_id=up.message_id,
        rejected_message_id=down.message_id,
        chosen_completion_id=up.completion_id,
        rejected_completion_id=down.completion_id,
        chosen_adapter_version=up.adapter_version,
        rejected_adapter_version=down.adapter_version,
        chosen_sampling=up.sampling,
        rejected_sampling=down.sampling,
        feedback_ids=tuple(sorted({*up.feedback_ids, *down.feedback_ids})),
    )


# --- the compiler ------------------------------------------------------------------------------


def compile_pairs(
    answers: Iterable[Answer],
    feedback: Iterable[Feedback],
    config: GateConfig | None = None,
    *,
    known_keys: Collection[str] = frozenset(),
) -> CompileResult:
    """Compile stored answers and feedback into gated DPO pairs and KTO rows.

    Call it once per training batch (the user cap is a share of what it returns). Pass the keys
    already stored as `known_keys` to get only new items. The result does not depend on the order
    of `answers` or `feedback`.
    """
    config = config or GateConfig()
    drops: Counter[str] = Counter()
    by_id, usable = _usable(answers, feedback, drops)
    pairs, unpaired = pairs_and_rows(by_id, usable, config, drops)
    trust = rater_trust(usable["thumbs"], usable["pick"]) if config.rater_trust else None
    redactions: Counter[str] = Counter()
    pairs_ok, pairs_excluded = gate(pairs, config, known_keys, drops, redactions, trust)
    unpaired_ok, unpaired_excluded = gate(unpaired, config, known_keys, drops, redactions, trust)
    return CompileResult(
        pairs=pairs_ok,
        unpaired=unpaired_ok,
        excluded=pairs_excluded + unpaired_excluded,
        dropped=Counter({str(reason): n for reason, n in drops.items() if n}),
        redactions=redactions,
    )


def _usable(
    answers: Iterable[Answer], feedback: Iterable[Feedback], drops: Counter[str]
) -> tuple[dict[str, Answer], dict[str, list[Feedback]]]:
    """(answers by message id, valid feedback on known answers by kind, oldest first); both in
    a fixed order whatever the input's."""
    by_id = dict(sorted(_index(answers, lambda a: a.message_id, "answers").items()))
    rows = sorted(
        _index(feedback, lambda f: f.id, "feedback rows").values(),
        key=lambda f: (f.created_at, f.id),
    )
    usable: dict[str, list[Feedback]] = defaultdict(list)
    for f in rows:
        if not _valid(f):
            drops[DropReason.INVALID_FEEDBACK] += 1
        elif f.message_id not in by_id:
            drops[DropReason.UNKNOWN_MESSAGE] += 1
        else:
            usable[f.kind].append(f)
    return by_id, usable


def _valid(f: Feedback) -> bool:
    if f.kind == "thumbs":
        return f.value in (1, -1)
    if f.kind == "pick":
        return f.other_message_id is not None and f.other_message_id != f.message_id
    if f.kind == "edit":
        return bool(f.text and f.text.strip())
    return False


def _index(rows: Iterable[Any], id_of: Any, what: str) -> dict[str, Any]:
    """Rows by id; repeated identical rows collapse, different rows under one id are a bug
    upstream (and would make the result depend on input order)."""
    index: dict[str, Any] = {}
    for row in rows:
        if id_of(row) in index and index[id_of(row)] != row:
            raise ValueError(f"two different {what} share the id {id_of(row)!r}")
        index[id_of(row)] = row
    return index
