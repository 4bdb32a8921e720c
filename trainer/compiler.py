"""Feedback → preference triplets: the compiler between stored chat feedback and DPO/KTO training.

The service turns its rows into the frozen records of `trainer.records` (`Answer`, `Feedback`)
and calls `compile_pairs`; it gets back a `CompileResult` with DPO `PreferencePair`s, unpaired
KTO `UnpairedExample`s, and a Counter of everything dropped, by reason. Pure Python (no torch,
no `service` import), deterministic, and independent of input order, so it is cheap to test and
safe to re-run: the same data always yields the same pairs under the same `key`s.

The recipe:

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
from collections.abc import Collection, Iterable
from typing import Any

from trainer.quality import GateConfig, gate
from trainer.records import Answer, CompileResult, DropReason, Feedback
from trainer.votes import pairs_and_rows, rater_trust


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
