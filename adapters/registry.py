"""The versioned adapter registry: immutable version directories, their states, promotion.

A version is a PEFT adapter directory copied once into ``<root>/<segment>/v<N>/`` and never
written again (``manifest.json`` beside the weights gains the evaluation, the weights never
change). Its id ``<segment>@v<N>`` is the name engines load it under; ids are never reused
because rows are never deleted (only the files of old versions are), so no engine can ever
serve stale weights under a reused name.

States and the only legal moves (``TRANSITIONS``)::

    candidate ──▶ approved ──▶ active ──▶ retired
        │            │            ▲          │
        └──▶ rejected ◀┘          └──────────┘  (rollback)

Exactly one version per segment is active; a partial unique index makes the database refuse a
second one, so two processes promoting at once cannot both win. Promotion and rollback are one
transaction each, and every state change is logged in ``AdapterEvent`` with who and why.
No torch here: the registry is plain files and rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, func, text
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

CANDIDATE, APPROVED, ACTIVE, RETIRED, REJECTED = (
    "candidate",
    "approved",
    "active",
    "retired",
    "rejected",
)
STATUSES = (CANDIDATE, APPROVED, ACTIVE, RETIRED, REJECTED)
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        (CANDIDATE, APPROVED),  # the gate (or an operator) approved it
        (CANDIDATE, REJECTED),  # the gate (or an operator) rejected it
        (APPROVED, REJECTED),  # an operator changed their mind before promoting
        (APPROVED, ACTIVE),  # promotion
        (ACTIVE, RETIRED),  # replaced by a promotion, or rolled back
        (RETIRED, ACTIVE),  # rollback to it
    }
)
# The files a version is made of; their bytes are its content hash. manifest.json is metadata.
# Safetensors only: a pickled `adapter_model.bin` can run code when loaded, so it is refused.
WEIGHT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What a version directory holds; anything else in the source (checkpoints, logs, pickles) is
# left behind.
VERSION_FILES = (*WEIGHT_FILES, "manifest.json", "README.md")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
SEGMENT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_SEGMENT = "default"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(t: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; they were stored in UTC.
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


class AdapterVersion(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("segment", "version", name="uq_adapter_segment_version"),
        Index(
            "uq_adapter_one_active",
            "segment",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: str = Field(primary_key=True)  # "<segment>@v<N>": the name engines load it under
    segment: str = Field(index=True)
    version: int
    status: str = Field(default=CANDIDATE, index=True)
    content_hash: str = Field(index=True)
    path: str
    base_model: str = ""
    parent: str | None = None  # the version it was warm-started from, if any
    previous: str | None = None  # the version it replaced when last promoted: rollback target
    manifest: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    eval_report: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    verdict: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    status_reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    status_changed_at: datetime = Field(default_factory=utcnow)
    promoted_at: datetime | None = None
    retired_at: datetime | None = None
    files_deleted_at: datetime | None = None

    @property
    def has_files(self) -> bool:
        return self.files_deleted_at is None


class AdapterEvent(SQLModel, table=True):
    """Every state change of every version: who, when, why."""

    id: str = Field(default_factory=lambda: f"ae-{uuid.uuid4().hex}", primary_key=True)
    version_id: str = Field(foreign_key="adapterversion.id", index=True)
    segment: str = Field(index=True)
    from_status: str | None = None
    to_status: str
    actor: str
    reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)


class RegistryError(Exception):
    """Base of the registry's errors; the service maps each subclass to an HTTP status."""


class VersionNotFound(RegistryError):
    pass


class InvalidAdapter(RegistryError):
    """The directory is not a PEFT adapter, or an argument is malformed."""


class IllegalTransition(RegistryError):
    def __init__(self, version_id: str, from_status: str, to_status: str, hint: str = ""):
        self.version_id, self.from_status, self.to_status = version_id, from_status, to_status
        allowed = sorted(t for f, t in TRANSITIONS if f == from_status) or ["nothing"]
        super().__init__(
            f"{version_id} is {from_status}; it cannot become {to_status} "
            f"(from {from_status} it can become: {', '.join(allowed)})"
            + (f"; {hint}" if hint else "")
        )


class PromotionConflict(RegistryError):
    """Another process changed the segment's active version first; re-read and retry."""


@dataclass(frozen=True)
class Retention:
    keep_retired: int = 3
    rejected_grace: timedelta = timedelta(days=3)


def content_hash(directory: Path) -> str:
    """sha256 over the weight files' names and bytes, in a fixed order."""
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            h.update(name.encode() + b"\0")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def check_segment(segment: str) -> str:
    if not SEGMENT_RE.match(segment):
        raise InvalidAdapter(
            f"segment {segment!r} is not valid: use 1-64 lowercase letters, digits, '-' or '_'"
        )
    return segment


ANY = object()  # promote(expect_active=ANY): whatever is active


def expected(name: str | None) -> str | None | object:
    """`expect_active` from what an operator typed: nothing (ANY), "base" (the base model,
    None) or a version id."""
    return ANY if name is None else None if name == "base" else name


def _name(row: AdapterVersion | None) -> str:
    return row.id if row is not None else "the base model"


def _check_adapter_dir(src: Path) -> None:
    """A LoRA adapter in PEFT's layout with safetensors weights whose header reads: checked
    before anything is copied, so junk is a clear error rather than a version that fails to
    load at promotion."""
    config = src / "adapter_config.json"
    if not config.is_file():
        raise InvalidAdapter(f"{src} is not a PEFT adapter directory (no adapter_config.json)")
    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (
            " (a pickled adapter_model.bin is refused: convert it)"
            if (src / "adapter_model.bin").is_file()
            else ""
        )
        raise InvalidAdapter(f"{src} has no adapter_model.safetensors{pickled}")
    try:
        parsed = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("peft_type") != "LORA":
        raise InvalidAdapter("adapter_config.json must describe a LoRA adapter (peft_type LORA)")
    check_safetensors(weights)


def check_safetensors(path: Path) -> dict[str, Any]:
    """Read a safetensors file's header (8-byte length, then JSON) without loading tensors:
    every tensor's byte range must lie inside the file. Returns the tensor table."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise InvalidAdapter(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidAdapter(f"{path.name} is not a safetensors file: {exc}") from exc
    tensors = (
        {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    )
    if not tensors:
        raise InvalidAdapter(f"{path.name} holds no tensors")
    for name, t in tensors.items():
        begin, end = (t.get("data_offsets") or [-1, -1]) if isinstance(t, dict) else (-1, -1)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise InvalidAdapter(f"{path.name}: tensor {name!r} has no valid data_offsets")
        if 8 + n + end > size:
            raise InvalidAdapter(f"{path.name} is truncated: tensor {name!r} lies past its end")
    return tensors


class Registry:
    """Adapter versions: files under ``root``, rows in ``db``."""

    def __init__(self, db: Database, root: Path):
        self.db = db
        self.root = Path(root)

    # --- reading -------------------------------------------------------------------------------
    def get(self, version_id: str) -> AdapterVersion:
        with Session(self.db, expire_on_commit=False) as s:
            row = s.get(AdapterVersion, version_id)
            if row is None:
                raise VersionNotFound(f"no adapter version {version_id!r}")
            return row

    def list(
        self, *, segment: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[AdapterVersion]:
        q = select(AdapterVersion)
        if segment is not None:
            q = q.where(AdapterVersion.segment == segment)
        if status is not None:
            q = q.where(AdapterVersion.status == status)
        q = q.order_by(col(AdapterVersion.created_at).desc(), col(AdapterVersion.version).desc())
        with Session(self.db, expire_on_commit=False) as s:
            return list(s.exec(q.limit(limit)).all())

    def active(self) -> dict[str, AdapterVersion]:
        """The active version of every segment that has one."""
        with Session(self.db, expire_on_commit=False) as s:
            rows = s.exec(select(AdapterVersion).where(AdapterVersion.status == ACTIVE)).all()
        return {r.segment: r for r in rows}

    def events(self, version_id: str | None = None, limit: int = 100) -> list[AdapterEvent]:
        q = select(AdapterEvent)
        if version_id is not None:
            q = q.where(AdapterEvent.version_id == version_id)
        q = q.order_by(col(AdapterEvent.created_at).desc())
        with Session(self.db, expire_on_commit=False) as s:
            return list(s.exec(q.limit(limit)).all())

    # --- writing -------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Session]:
        # On SQLite, `service.storage.db` begins every transaction IMMEDIATE, so a promotion from
        # the CLI waits for a replica's write instead of failing with "database is locked".
        with Session(self.db, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except IntegrityError as exc:
                s.rollback()
                raise PromotionConflict(
                    f"another process changed this segment at the same time; try again ({exc.orig})"
                ) from exc
            except BaseException:
                s.rollback()
                raise

    def register(
        self,
        src: Path,
        *,
        segment: str = DEFAULT_SEGMENT,
        base_model: str = "",
        parent: str | None = None,
        actor: str = "system",
        reason: str | None = None,
    ) -> AdapterVersion:
        """Copy a PEFT adapter directory in as a new candidate version.

        Registering the same weights again in a segment returns the existing version (a retried
        registration creates nothing)."""
        src = Path(src)
        check_segment(segment)
        _check_adapter_dir(src)
        digest = content_hash(src)
        with Session(self.db, expire_on_commit=False) as s:
            same = s.exec(
                select(AdapterVersion).where(
                    AdapterVersion.segment == segment, AdapterVersion.content_hash == digest
                )
            ).first()
            if same is not None:
                return same
        manifest = {}
        if (src / "manifest.json").is_file():
            try:
                manifest = json.loads((src / "manifest.json").read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidAdapter(f"manifest.json is not valid JSON: {exc}") from exc
            if not isinstance(manifest, dict):
                raise InvalidAdapter("manifest.json must hold a JSON object")

        seg_dir = self.root / segment
        seg_dir.mkdir(parents=True, exist_ok=True)
        staging = seg_dir / f".incoming-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for name in VERSION_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, staging / name)
            for _attempt in range(5):
                try:
                    return self._insert(
                        staging, segment, digest, base_model, parent, manifest, actor, reason
                    )
                except PromotionConflict:
                    continue  # another registration took the number; take the next
            raise PromotionConflict(f"could not allocate a version number in {segment!r}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _insert(
        self,
        staging: Path,
        segment: str,
        digest: str,
        base_model: str,
        parent: str | None,
        manifest: dict[str, Any],
        actor: str,
        reason: str | None,
    ) -> AdapterVersion:
        with self._tx() as s:
            number, final = self._next_version(s, segment)
            vid = f"{segment}@v{number}"
            manifest = {
                **manifest,
                "registry": {
                    "id": vid,
                    "segment": segment,
                    "version": number,
                    "content_hash": digest,
                    "parent": parent,
                    "registered_at": utcnow().isoformat(),
                },
            }
            row = AdapterVersion(
                id=vid,
                segment=segment,
                version=number,
                content_hash=digest,
                path=str(final),
                base_model=base_model or str(manifest.get("base_model", "")),
                parent=parent,
                manifest=manifest,
                status_reason=reason,
            )
            s.add(row)
            s.flush()  # a clash on (segment, version) surfaces here, before the files move
            s.add(
                AdapterEvent(
                    version_id=vid, segment=segment, to_status=CANDIDATE, actor=actor, reason=reason
                )
            )
            s.flush()
            _write_json(staging / "manifest.json", manifest)
            # On disk before the commit that names them: a power cut after the commit must not
            # leave an active version whose weights were still in the page cache.
            _fsync_tree(staging)
            os.replace(staging, final)
            _fsync_dir(final.parent)
            try:
                s.commit()
            except Exception:
                shutil.rmtree(final, ignore_errors=True)
                raise
            return row

    def _next_version(self, s: Session, segment: str) -> tuple[int, Path]:
        """The segment's next version number and its directory, which must not exist yet."""
        last = s.exec(
            select(func.max(AdapterVersion.version)).where(AdapterVersion.segment == segment)
        ).one()
        number = (last or 0) + 1
        final = self.root / segment / f"v{number}"
        if final.exists():  # left by a crash between rename and commit: never reuse it
            final.rename(final.with_name(f".orphan-v{number}-{uuid.uuid4().hex[:8]}"))
        return number, final

    def record_eval(
        self, version_id: str, report: dict[str, Any], verdict: dict[str, Any] | None
    ) -> AdapterVersion:
        """Keep the evaluation report (and the gate's verdict) with the version: in the database
        and in its manifest. The weights are untouched."""
        with self._tx() as s:
            row = self._row(s, version_id)
            row.eval_report, row.verdict = report, verdict
            row.manifest = {**row.manifest, "eval": report, "verdict": verdict}
            s.add(row)
            if row.has_files:
                _write_json(Path(row.path) / "manifest.json", row.manifest)
            return row

    def transition(
        self, version_id: str, to_status: str, *, actor: str, reason: str | None = None
    ) -> AdapterVersion:
        """Approve or reject a candidate (promotion and rollback have their own methods)."""
        if to_status not in (APPROVED, REJECTED):
            raise InvalidAdapter(f"use promote() or rollback() to make a version {to_status}")
        with self._tx() as s:
            row = self._row(s, version_id)
            self._move(s, row, to_status, actor, reason)
            return row

    def promote(
        self,
        version_id: str,
        *,
        actor: str,
        reason: str | None = None,
        expect_active: str | None | object = ANY,
    ) -> AdapterVersion:
        """Make an approved (or retired) version its segment's active one; the active one
        retires. One transaction.

        ``expect_active`` fences the promotion: the version (None: the base model) the caller
        compared the candidate with. If another became active meanwhile (a raced or stale
        refresh, another operator), nothing changes and PromotionConflict is raised."""
        with self._tx() as s:
            row = self._row(s, version_id)
            current = self._active(s, row.segment)
            if expect_active is not ANY and (current.id if current else None) != expect_active:
                raise PromotionConflict(
                    f"{row.segment!r} is served by {_name(current)}, not "
                    f"{expect_active or 'the base model'}; {version_id} was compared with the "
                    "latter and was not promoted"
                )
            if row.status == ACTIVE:
                return row
            if not row.has_files:
                raise IllegalTransition(
                    version_id, row.status, ACTIVE, "its files were deleted by retention"
                )
            if (row.status, ACTIVE) not in TRANSITIONS:
                raise IllegalTransition(version_id, row.status, ACTIVE)
            if current is not None:
                self._move(s, current, RETIRED, actor, f"replaced by {version_id}")
                row.previous = current.id
                s.flush()  # the old one stops being active before the new one starts
            self._move(s, row, ACTIVE, actor, reason)
            return row

    def rollback(
        self,
        segment: str = DEFAULT_SEGMENT,
        *,
        to: str | None = None,
        actor: str,
        reason: str | None = None,
        expect_active: str | None = None,
    ) -> AdapterVersion | None:
        """Retire the segment's active version and reactivate ``to`` (default: the version it
        replaced, else the newest retired one with files; with none, the segment goes back to
        the base model). Returns the version now active, or None for the base model.

        ``expect_active`` makes an automatic rollback a no-op check: if the active version is
        no longer the one that was judged, nothing changes and PromotionConflict is raised."""
        with self._tx() as s:
            current = self._active(s, segment)
            if current is None:
                raise IllegalTransition(
                    f"segment {segment!r}",
                    "without an active version",
                    RETIRED,
                    "nothing to roll back",
                )
            if expect_active is not None and current.id != expect_active:
                raise PromotionConflict(
                    f"{segment!r} is now served by {current.id}, not {expect_active}; "
                    "nothing was rolled back"
                )
            target = self._rollback_target(s, current, to)
            why = reason or "rollback"
            self._move(s, current, RETIRED, actor, why)
            if target is None:
                return None
            s.flush()
            self._move(s, target, ACTIVE, actor, f"rollback from {current.id}: {why}")
            return target

    def _rollback_target(
        self, s: Session, current: AdapterVersion, to: str | None
    ) -> AdapterVersion | None:
        if to is not None:
            target = self._row(s, to)
            if target.segment != current.segment:
                raise InvalidAdapter(
                    f"{to} belongs to segment {target.segment!r}, not {current.segment!r}"
                )
            if target.status != RETIRED or not target.has_files:
                raise IllegalTransition(
                    to, target.status, ACTIVE, "a rollback goes to a retired version with files"
                )
            return target
        if current.previous is None:
            return None  # it replaced the base model: go back to it
        prev = s.get(AdapterVersion, current.previous)
        if prev is not None and prev.status == RETIRED and prev.has_files:
            return prev
        # Its predecessor's files are gone: the newest retired version that still has files.
        return s.exec(
            select(AdapterVersion)
            .where(
                AdapterVersion.segment == current.segment,
                AdapterVersion.status == RETIRED,
                col(AdapterVersion.files_deleted_at).is_(None),
                AdapterVersion.id != current.id,
            )
            .order_by(col(AdapterVersion.retired_at).desc())
        ).first()

    def collect_garbage(
        self, retention: Retention, *, actor: str = "retention", now: datetime | None = None
    ) -> list[str]:
        """Delete the files of retired versions beyond the newest ``keep_retired`` per segment
        and of rejected versions older than the grace period. Rows stay (ids are never
        reused). Returns the ids whose files were deleted."""
        now = now or utcnow()
        deleted: list[str] = []
        with self._tx() as s:
            rows = s.exec(
                select(AdapterVersion).where(
                    col(AdapterVersion.status).in_([RETIRED, REJECTED]),
                    col(AdapterVersion.files_deleted_at).is_(None),
                )
            ).all()
            by_segment: dict[str, list[AdapterVersion]] = {}
            for r in rows:
                if r.status == RETIRED:
                    by_segment.setdefault(r.segment, []).append(r)
                elif now - as_utc(r.status_changed_at) >= retention.rejected_grace:
                    deleted.append(r.id)
            for retired in by_segment.values():
                retired.sort(
                    key=lambda r: as_utc(r.retired_at) or as_utc(r.created_at), reverse=True
                )
                deleted += [r.id for r in retired[retention.keep_retired :]]
            for vid in deleted:
                row = s.get(AdapterVersion, vid)
                row.files_deleted_at = now
                s.add(row)
                s.add(
                    AdapterEvent(
                        version_id=vid,
                        segment=row.segment,
                        from_status=row.status,
                        to_status=row.status,
                        actor=actor,
                        reason="files deleted by retention",
                    )
                )
        for vid in deleted:  # after the commit: a row never points at files already gone
            shutil.rmtree(self.get(vid).path, ignore_errors=True)
        return deleted

    # --- helpers -------------------------------------------------------------------------------
    def _row(self, s: Session, version_id: str) -> AdapterVersion:
        row = s.get(AdapterVersion, version_id)
        if row is None:
            raise VersionNotFound(
                f"no adapter version {version_id!r}; `prefloop adapters list` shows them"
            )
        return row

    def _active(self, s: Session, segment: str) -> AdapterVersion | None:
        return s.exec(
            select(AdapterVersion).where(
                AdapterVersion.segment == segment, AdapterVersion.status == ACTIVE
            )
        ).first()

    def _move(
        self, s: Session, row: AdapterVersion, to_status: str, actor: str, reason: str | None
    ) -> None:
        if (row.status, to_status) not in TRANSITIONS:
            raise IllegalTransition(row.id, row.status, to_status)
        now = utcnow()
        s.add(
            AdapterEvent(
                version_id=row.id,
                segment=row.segment,
                from_status=row.status,
                to_status=to_status,
                actor=actor,
                reason=reason,
                created_at=now,
            )
        )
        row.status, row.status_reason, row.status_changed_at = to_status, reason, now
        if to_status == ACTIVE:
            row.promoted_at = now
        elif to_status == RETIRED:
            row.retired_at = now
        s.add(row)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then the directories (children before parents)."""
    for dirpath, _dirs, files in sorted(os.walk(root), key=lambda w: -len(w[0])):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))
