"""The adapter registry on a real SQLite file: immutable versions, the transition table, one
active version per segment, promotion and rollback, retention."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from adapters.registry import (
    ACTIVE,
    APPROVED,
    CANDIDATE,
    REJECTED,
    RETIRED,
    STATUSES,
    TRANSITIONS,
    AdapterVersion,
    IllegalTransition,
    InvalidAdapter,
    PromotionConflict,
    Registry,
    Retention,
    VersionNotFound,
    content_hash,
    utcnow,
)
from service.core.config import Settings
from service.storage.db import init_db, make_engine
from tests.conftest import BOTH_DATABASES

pytestmark = BOTH_DATABASES


def fake_adapter(root: Path, name: str, payload: bytes | None = None) -> Path:
    """A PEFT-layout directory whose safetensors file holds ``payload`` (default: bytes from
    the name) as one uint8 tensor: the registry reads the header, copies and hashes."""
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    data = np.frombuffer(payload or name.encode() * 64, dtype=np.uint8)
    save_file({"lora_A.weight": data}, str(d / "adapter_model.safetensors"))
    (d / "manifest.json").write_text(json.dumps({"base_model": "tiny", "config": {"beta": 0.1}}))
    return d


@pytest.fixture
def registry(tmp_path: Path, db_url: str) -> Registry:
    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    yield Registry(db, tmp_path / "adapters")
    db.dispose()


def approved(registry: Registry, tmp_path: Path, name: str, segment: str = "default") -> str:
    row = registry.register(fake_adapter(tmp_path / "src", name), segment=segment, actor="t")
    registry.transition(row.id, APPROVED, actor="t", reason="test")
    return row.id


def test_register_copies_an_immutable_version(registry: Registry, tmp_path: Path) -> None:
    src = fake_adapter(tmp_path / "src", "a")
    row = registry.register(src, actor="alice", reason="first")
    assert (row.id, row.version, row.status) == ("default@v1", 1, CANDIDATE)
    dest = Path(row.path)
    assert dest == registry.root / "default" / "v1"
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    assert row.content_hash == content_hash(src)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["config"] == {"beta": 0.1}  # the trainer's manifest is kept
    assert manifest["registry"]["id"] == "default@v1"
    assert manifest["registry"]["content_hash"] == row.content_hash
    assert row.base_model == "tiny"
    [event] = registry.events(row.id)
    assert (event.to_status, event.actor, event.reason) == (CANDIDATE, "alice", "first")

    # The same weights again: the same version (a retried registration creates nothing).
    assert registry.register(src, actor="alice").id == "default@v1"
    # New weights: the next number; another segment has its own line of versions.
    assert registry.register(fake_adapter(tmp_path / "src", "b")).id == "default@v2"
    assert registry.register(src, segment="support").id == "support@v1"


def test_register_refuses_what_is_not_an_adapter(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidAdapter, match="no adapter_config.json"):
        registry.register(tmp_path / "empty")
    with pytest.raises(InvalidAdapter, match="segment 'Bad Segment' is not valid"):
        registry.register(fake_adapter(tmp_path, "x"), segment="Bad Segment")
    with pytest.raises(VersionNotFound, match="no adapter version 'default@v9'"):
        registry.get("default@v9")


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (s, t)
        for s, t in product(STATUSES, STATUSES)
        if s != t and (s, t) not in TRANSITIONS and t in (APPROVED, REJECTED, ACTIVE)
    ],
)
def test_illegal_transitions_are_refused(
    registry: Registry, tmp_path: Path, start: str, to: str
) -> None:
    """Drive a version to `start` through legal moves, then try the illegal one."""
    vid = registry.register(fake_adapter(tmp_path / "src", "a")).id
    path = {
        CANDIDATE: [],
        APPROVED: [APPROVED],
        REJECTED: [REJECTED],
        ACTIVE: [APPROVED, ACTIVE],
        RETIRED: [APPROVED, ACTIVE, RETIRED],
    }[start]
    for step in path:
        if step == ACTIVE:
            registry.promote(vid, actor="t")
        elif step == RETIRED:
            registry.rollback(actor="t")
        else:
            registry.transition(vid, step, actor="t")
    assert registry.get(vid).status == start
    with pytest.raises(IllegalTransition, match=f"{vid} is {start}; it cannot become {to}"):
        if to == ACTIVE:
            registry.promote(vid, actor="t")
        else:
            registry.transition(vid, to, actor="t")
    assert registry.get(vid).status == start  # nothing changed


def test_promotion_retires_the_active_version_in_one_step(
    registry: Registry, tmp_path: Path
) -> None:
    v1, v2 = approved(registry, tmp_path, "a"), approved(registry, tmp_path, "b")
    registry.promote(v1, actor="ops", reason="first")
    assert {s: r.id for s, r in registry.active().items()} == {"default": v1}
    row = registry.promote(v2, actor="ops", reason="better")
    assert (row.status, row.previous) == (ACTIVE, v1)
    assert registry.get(v1).status == RETIRED
    assert {s: r.id for s, r in registry.active().items()} == {"default": v2}
    moves = [(e.version_id, e.from_status, e.to_status) for e in reversed(registry.events())]
    assert moves[-2:] == [(v1, ACTIVE, RETIRED), (v2, APPROVED, ACTIVE)]
    # Promoting the active version again changes nothing.
    assert registry.promote(v2, actor="ops").status == ACTIVE


def test_a_promotion_fenced_on_an_incumbent_that_changed_does_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    """A candidate gated against v1 must not replace v2, which became active meanwhile (a
    raced refresh or another operator); nor one gated against the base model replace v1."""
    v1, v2, v3 = (approved(registry, tmp_path, n) for n in "abc")
    with pytest.raises(PromotionConflict, match="served by the base model, not default@v1"):
        registry.promote(v3, actor="refresh", expect_active=v1)
    registry.promote(v1, actor="ops", expect_active=None)
    registry.promote(v2, actor="ops", expect_active=v1)
    before = [(e.version_id, e.to_status) for e in registry.events()]
    for stale in (v1, None):
        with pytest.raises(PromotionConflict, match="was not promoted"):
            registry.promote(v3, actor="refresh", expect_active=stale)
    assert [(e.version_id, e.to_status) for e in registry.events()] == before
    assert (registry.get(v2).status, registry.get(v3).status) == (ACTIVE, APPROVED)
    assert registry.promote(v3, actor="refresh", expect_active=v2).previous == v2


def test_the_database_refuses_a_second_active_version(registry: Registry, tmp_path: Path) -> None:
    v1, v2 = approved(registry, tmp_path, "a"), approved(registry, tmp_path, "b")
    registry.promote(v1, actor="t")
    with Session(registry.db) as s, pytest.raises(IntegrityError):
        row = s.get(AdapterVersion, v2)
        row.status = ACTIVE
        s.add(row)
        s.commit()


def test_concurrent_promotions_leave_exactly_one_active(registry: Registry, tmp_path: Path) -> None:
    ids = [approved(registry, tmp_path, f"v{i}") for i in range(6)]
    errors: list[Exception] = []

    def promote(vid: str) -> None:
        try:
            registry.promote(vid, actor=vid)
        except (PromotionConflict, IllegalTransition) as exc:  # lost the race: a typed error
            errors.append(exc)
        except Exception as exc:  # noqa: BLE001 - SQLite may refuse a write: also a lost race
            if "locked" not in str(exc):
                raise

    threads = [threading.Thread(target=promote, args=(v,)) for v in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [registry.get(v).status for v in ids]
    assert statuses.count(ACTIVE) == 1
    assert set(statuses) <= {ACTIVE, RETIRED, APPROVED}


def test_rollback_goes_to_the_replaced_version_then_to_the_base(
    registry: Registry, tmp_path: Path
) -> None:
    v1, v2 = approved(registry, tmp_path, "a"), approved(registry, tmp_path, "b")
    registry.promote(v1, actor="t")
    registry.promote(v2, actor="t")
    with pytest.raises(PromotionConflict, match="nothing was rolled back"):
        registry.rollback(actor="watch", expect_active=v1)  # judged a version no longer active
    assert registry.get(v2).status == ACTIVE

    back = registry.rollback(actor="watch", reason="thumbs dropped", expect_active=v2)
    assert back is not None and back.id == v1 and back.status == ACTIVE
    assert registry.get(v2).status == RETIRED
    assert registry.get(v2).status_reason == "thumbs dropped"
    assert registry.get(v1).status_reason == f"rollback from {v2}: thumbs dropped"

    # v1 replaced the base model: rolling it back leaves the segment on the base model.
    assert registry.rollback(actor="t") is None
    assert registry.active() == {}
    with pytest.raises(IllegalTransition, match="nothing to roll back"):
        registry.rollback(actor="t")

    # A retired version can be made active again, by name.
    registry.promote(v2, actor="t")
    assert registry.rollback(to=v1, actor="t").id == v1


def test_record_eval_keeps_the_weights(registry: Registry, tmp_path: Path) -> None:
    row = registry.register(fake_adapter(tmp_path / "src", "a"))
    weights = (Path(row.path) / "adapter_model.safetensors").read_bytes()
    report = {"candidate": {"golden": {"n": 1, "pass_rate": 1.0}}}
    registry.record_eval(row.id, report, {"approved": True, "reasons": []})
    manifest = json.loads((Path(row.path) / "manifest.json").read_text())
    assert manifest["eval"] == report and manifest["verdict"]["approved"] is True
    assert registry.get(row.id).eval_report == report
    assert (Path(row.path) / "adapter_model.safetensors").read_bytes() == weights
    assert content_hash(Path(row.path)) == row.content_hash


def test_retention_deletes_old_files_but_never_reuses_names(
    registry: Registry, tmp_path: Path
) -> None:
    ids = [approved(registry, tmp_path, f"v{i}") for i in range(4)]
    for vid in ids:
        registry.promote(vid, actor="t")  # v0..v2 retire in turn; v3 stays active
    rejected = registry.register(fake_adapter(tmp_path / "src", "bad"))
    registry.transition(rejected.id, REJECTED, actor="gate", reason="flipped labels")

    # Within the grace period the rejected version's files stay; only retired ones beyond 1 go.
    deleted = registry.collect_garbage(Retention(keep_retired=1, rejected_grace=timedelta(days=1)))
    assert sorted(deleted) == sorted(ids[:2])
    for vid in ids[:2]:
        row = registry.get(vid)
        assert row.files_deleted_at is not None and not Path(row.path).exists()
    assert Path(registry.get(ids[2]).path).exists()
    assert Path(registry.get(rejected.id).path).exists()
    with pytest.raises(IllegalTransition, match="deleted by retention"):
        registry.promote(ids[0], actor="t")

    later = utcnow() + timedelta(days=2)
    deleted = registry.collect_garbage(
        Retention(keep_retired=1, rejected_grace=timedelta(days=1)), now=later
    )
    assert deleted == [rejected.id]
    assert not Path(registry.get(rejected.id).path).exists()

    # Names are never reused: the next version is v6, even though v1's files are gone.
    assert registry.register(fake_adapter(tmp_path / "src", "new")).id == "default@v6"


def test_a_crash_leftover_directory_is_never_reused(registry: Registry, tmp_path: Path) -> None:
    leftover = registry.root / "default" / "v1"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"stale")
    row = registry.register(fake_adapter(tmp_path / "src", "a"))
    assert row.id == "default@v1"
    assert (Path(row.path) / "adapter_model.safetensors").read_bytes() != b"stale"
    assert any(p.name.startswith(".orphan-v1-") for p in (registry.root / "default").iterdir())
