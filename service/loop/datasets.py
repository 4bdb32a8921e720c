"""What a refresh trains on and judges its candidate by: the segment's approved pairs and lone
thumbs (a seeded share held out for the gate), the base model, the golden set and the canary
prompts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

from service.core.config import Settings
from service.storage.tables import PreferencePair, utcnow
from trainer import records, votes

# --- the segment's pairs ----------------------------------------------------------------------


def approved_items(db: Database, segment: str, tenant: str) -> list[PreferencePair]:
    """The segment's approved pairs and lone thumbs, oldest first. A segment learns only from
    the tenant that owns it (tenant isolation)."""
    with Session(db) as s:
        return list(
            s.exec(
                select(PreferencePair)
                .where(
                    PreferencePair.status == "approved",
                    PreferencePair.segment == segment,
                    PreferencePair.tenant == tenant,
                )
                .order_by(col(PreferencePair.created_at), col(PreferencePair.key))
            ).all()
        )


def _heldout(key: str, fraction: float) -> bool:
    """A stable split: a pair is held out (or not) whichever refresh sees it."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


@dataclass
class TrainingSets:
    """A refresh's data as trainer rows: what it trains on and what the gate judges it by."""

    train: list[dict[str, Any]]
    heldout_pairs: list[dict[str, Any]]
    heldout_unpaired: list[dict[str, Any]]
    counts: dict[str, int]


def training_sets(
    items: Sequence[records.PreferencePair | records.UnpairedExample], settings: Settings
) -> TrainingSets:
    """Split a segment's approved items (a seeded share held out for the gate, stable across
    refreshes), then, on each side, join lone thumbs into matched pairs (`match_thumbs`).
    Pairs train with the configured DPO-family loss and the remaining thumbs with KTO."""
    fraction, window = settings.refresh_heldout_fraction, settings.refresh_match_window_hours
    sides: dict[bool, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    counts: dict[str, int] = {}
    for held in (False, True):
        mine = [x for x in items if _heldout(x.key, fraction) == held]
        pairs = [x for x in mine if isinstance(x, records.PreferencePair)]
        singles = [x for x in mine if isinstance(x, records.UnpairedExample)]
        matched, rest = votes.match_thumbs(singles, window)
        sides[held] = (
            [records.dpo_row(x) for x in pairs + matched],
            [records.kto_row(x) for x in rest],
        )
        prefix = "heldout_" if held else ""
        counts |= {
            f"{prefix}pairs": len(pairs),
            f"{prefix}matched": len(matched),
            f"{prefix}thumbs_up": sum(x.label for x in rest),
            f"{prefix}thumbs_down": sum(not x.label for x in rest),
        }
    train = sides[False][0] + sides[False][1]
    return TrainingSets(train, sides[True][0], sides[True][1], counts)


def write_sets(sets: TrainingSets, work: Path) -> None:
    """train.jsonl, heldout.jsonl and heldout_unpaired.jsonl, for the trainer's subprocesses."""
    records.write_jsonl(sets.train, work / "train.jsonl")
    records.write_jsonl(sets.heldout_pairs, work / "heldout.jsonl")
    records.write_jsonl(sets.heldout_unpaired, work / "heldout_unpaired.jsonl")


def describe(counts: dict[str, int]) -> str:
    return (
        f"{counts['pairs']} pairs, {counts['matched']} matched from thumbs, "
        f"{counts['thumbs_up']} thumbs up and {counts['thumbs_down']} down alone"
    )


def mark_used(pair_ids: list[str], run_id: str, db: Database) -> None:
    """Pairs a refresh trained or judged on are `used` (whatever the verdict: a rejected
    update's pairs go back to operators for review, not into the next refresh unseen)."""
    with Session(db) as s:
        for row in s.exec(select(PreferencePair).where(col(PreferencePair.id).in_(pair_ids))):
            row.status = "used"
            row.provenance = {**row.provenance, "run_id": run_id}
            row.updated_at = utcnow()
            s.add(row)
        s.commit()


# --- the base model, the golden set, the canary prompts ---------------------------------------


def base_model_path(settings: Settings) -> Path:
    from service.engines.modelprep import prepare_default_model

    if settings.model:
        return Path(settings.model)
    return prepare_default_model(settings.models_dir, progress=False)


def segment_golden_file(settings: Settings, segment: str) -> Path:
    """A segment's own golden items, checked beside the shipped and the operator's."""
    return settings.home_dir / "golden" / f"{segment}.jsonl"


def golden_for(settings: Settings, segment: str) -> list[Any]:
    """The golden set a segment's candidates are checked on: the shipped items (unless
    `golden_include_shipped` is off), the operator's file, then the segment's own file
    (PREFLOOP_HOME/golden/<segment>.jsonl); a later item replaces an earlier one with its id."""
    from trainer.golden import SHIPPED_GOLDEN, load_golden

    files = [SHIPPED_GOLDEN] if settings.golden_include_shipped else []
    files += [settings.golden_file, segment_golden_file(settings, segment)]
    items = {item.id: item for path in files for item in load_golden(path)}
    return list(items.values())


def canary_for(settings: Settings, segment: str) -> Path | None:
    """The segment's canary prompts (PREFLOOP_HOME/canary/<segment>.jsonl, else
    PREFLOOP_HOME/canary.jsonl), or None for the shipped set."""
    for path in (
        settings.home_dir / "canary" / f"{segment}.jsonl",
        settings.home_dir / "canary.jsonl",
    ):
        if path.is_file():
            return path
    return None
