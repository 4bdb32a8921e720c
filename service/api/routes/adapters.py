"""Operator API for adapter versions (list, show, register, approve/reject, promote, rollback)
and the golden sets the regression gate checks. Every route sits behind `OperatorDep`; an
operator sees only the segments its tenant owns (`PREFLOOP_SEGMENT_TENANTS`): another tenant's
versions are 404s. The shared golden set is checked for every segment (admins edit it); each
segment has its own items too, which its tenant's operators edit."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from adapters.registry import (
    APPROVED,
    REJECTED,
    WEIGHT_FILES,
    AdapterVersion,
    Registry,
    expected,
)
from service.api.deps import OperatorDep, RouterDep, SettingsDep, actor
from service.api.schemas import (
    SEGMENT_SCHEMA,
    AdapterAction,
    AdapterDetail,
    AdapterEventPublic,
    AdapterList,
    AdapterPublic,
    GoldenItemBody,
    GoldenList,
    PromoteRequest,
    RegisterAdapter,
    RollbackRequest,
    RollbackResult,
)
from service.core.config import Settings
from service.core.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from service.core.identity import Principal, Role
from service.loop.datasets import segment_golden_file

router = APIRouter(prefix="/v1/operator", tags=["adapters"])
UPLOAD_PATH = router.prefix + "/adapters/upload"
_golden_lock = threading.Lock()  # one golden-set edit at a time in this process


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _visible(request: Request, operator: Principal, segment_or_version: str) -> bool:
    segment = segment_or_version.split("@")[0]
    return operator.sees_tenant(request.app.state.settings.tenant_of(segment))


def _check(request: Request, operator: Principal, version_id: str) -> None:
    if not _visible(request, operator, version_id):
        raise NotFoundError(f"adapter version {version_id!r} not found", code="adapter_not_found")


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(
    request: Request,
    adapters: RouterDep,
    operator: OperatorDep,
    segment: str | None = None,
    status: Literal["candidate", "approved", "active", "retired", "rejected"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AdapterList:
    """Versions, newest first; `serving` is what this replica routes each segment to."""
    rows = await run_in_threadpool(
        _registry(request).list, segment=segment, status=status, limit=limit
    )
    return AdapterList(
        data=[
            AdapterPublic.model_validate(r) for r in rows if _visible(request, operator, r.segment)
        ],
        serving={k: v for k, v in adapters.routes.items() if _visible(request, operator, k)},
        load_errors={
            k: v for k, v in adapters.load_errors.items() if _visible(request, operator, k)
        },
    )


@router.get("/adapters/{version_id}", response_model=AdapterDetail)
async def show_adapter(request: Request, version_id: str, operator: OperatorDep) -> AdapterDetail:
    _check(request, operator, version_id)
    registry = _registry(request)
    row = await run_in_threadpool(registry.get, version_id)
    events = await run_in_threadpool(registry.events, version_id)
    return AdapterDetail(
        **AdapterPublic.model_validate(row).model_dump(),
        manifest=row.manifest,
        eval_report=row.eval_report,
        events=[AdapterEventPublic.model_validate(e) for e in events],
    )


def _importable(settings: Settings, operator: Principal, raw: str) -> Path:
    """A directory operators may register from: under an admin-configured import root (with
    no roots configured, only in development mode), and never inside the adapter store, which
    holds every tenant's versions."""
    try:
        path = Path(raw).expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a loop, an unknown ~user
        raise InvalidRequestError(
            f"{raw[:200]!r} is not a usable path: {exc}", param="path"
        ) from exc
    if settings.adapters_dir.resolve() in (path, *path.parents):
        raise PermissionDeniedError(
            f"{raw} is inside the adapter store; a registered version is promoted or rolled "
            "back by its id, not registered again"
        )
    roots = settings.adapter_import_roots
    if roots and not any(r in (path, *path.parents) for r in roots):
        raise PermissionDeniedError(
            f"{raw} is outside the adapter import roots ({', '.join(map(str, roots))}; "
            f"PREFLOOP_ADAPTER_IMPORT_ROOTS); upload the adapter instead ({UPLOAD_PATH})"
        )
    if not roots and not operator.dev:
        raise PermissionDeniedError(
            "registering server directories is off (PREFLOOP_ADAPTER_IMPORT_ROOTS is empty): "
            f"upload the adapter ({UPLOAD_PATH}), or ask an admin to set the roots"
        )
    if not path.is_dir():
        raise InvalidRequestError(f"{raw} is not a directory on the server", param="path")
    return path


@router.post("/adapters", response_model=AdapterPublic, status_code=201)
async def register_adapter(
    request: Request, body: RegisterAdapter, operator: OperatorDep, settings: SettingsDep
) -> AdapterPublic:
    """Register a PEFT directory on the server (under PREFLOOP_ADAPTER_IMPORT_ROOTS) as a new
    candidate; the same weights again: the existing version."""
    _check(request, operator, body.segment)
    path = _importable(settings, operator, body.path)
    row = await run_in_threadpool(
        lambda: _registry(request).register(
            path,
            segment=body.segment,
            parent=body.parent,
            actor=actor(operator),
            reason=body.reason,
        )
    )
    return AdapterPublic.model_validate(row)


@router.post("/adapters/upload", response_model=AdapterPublic, status_code=201)
async def upload_adapter(
    request: Request,
    operator: OperatorDep,
    settings: SettingsDep,
    config: Annotated[UploadFile, File(description="adapter_config.json (a LoRA adapter)")],
    weights: Annotated[UploadFile, File(description="adapter_model.safetensors")],
    segment: Annotated[str, Form(max_length=64, pattern=SEGMENT_SCHEMA["pattern"])] = "default",
    parent: Annotated[str | None, Form(max_length=128)] = None,
    reason: Annotated[str | None, Form(max_length=2000)] = None,
) -> AdapterPublic:
    """Upload a LoRA adapter (PEFT's adapter_config.json and its safetensors weights; pickled
    weights are refused) as a new candidate in `segment`."""
    _check(request, operator, segment)
    tmp = settings.home_dir / "tmp"

    def register() -> AdapterVersion:
        tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp, prefix="upload-") as staging:
            for part, name in zip((config, weights), WEIGHT_FILES, strict=True):
                with open(Path(staging) / name, "wb") as f:
                    shutil.copyfileobj(part.file, f, 1 << 20)
            return _registry(request).register(
                Path(staging), segment=segment, parent=parent, actor=actor(operator), reason=reason
            )

    return AdapterPublic.model_validate(await run_in_threadpool(register))


async def _transition(
    request: Request, version_id: str, to: str, body: AdapterAction | None, operator: Principal
) -> AdapterPublic:
    _check(request, operator, version_id)
    reason = body.reason if body else None
    row = await run_in_threadpool(
        lambda: _registry(request).transition(version_id, to, actor=actor(operator), reason=reason)
    )
    return AdapterPublic.model_validate(row)


@router.post("/adapters/{version_id}/approve", response_model=AdapterPublic)
async def approve_adapter(
    request: Request, version_id: str, operator: OperatorDep, body: AdapterAction | None = None
) -> AdapterPublic:
    """Approve a candidate by hand (the gate normally decides)."""
    return await _transition(request, version_id, APPROVED, body, operator)


@router.post("/adapters/{version_id}/reject", response_model=AdapterPublic)
async def reject_adapter(
    request: Request, version_id: str, operator: OperatorDep, body: AdapterAction | None = None
) -> AdapterPublic:
    return await _transition(request, version_id, REJECTED, body, operator)


@router.post("/adapters/{version_id}/promote", response_model=AdapterPublic)
async def promote_adapter(
    request: Request,
    version_id: str,
    operator: OperatorDep,
    adapters: RouterDep,
    body: PromoteRequest | None = None,
) -> AdapterPublic:
    """Make an approved (or retired) version active. Every replica swaps to it within
    `adapter_poll_seconds`; this one at once. `expect_active` fences it against a change
    made meanwhile."""
    _check(request, operator, version_id)
    body = body or PromoteRequest()
    row = await run_in_threadpool(
        lambda: _registry(request).promote(
            version_id,
            actor=actor(operator),
            reason=body.reason,
            expect_active=expected(body.expect_active),
        )
    )
    adapters.kick()
    return AdapterPublic.model_validate(row)


@router.post("/adapters/rollback", response_model=RollbackResult)
async def rollback_adapter(
    request: Request, body: RollbackRequest, operator: OperatorDep, adapters: RouterDep
) -> RollbackResult:
    """Retire the segment's active version and reactivate its predecessor (or `to`)."""
    _check(request, operator, body.segment)
    if body.to is not None:
        _check(request, operator, body.to)
    row = await run_in_threadpool(
        lambda: _registry(request).rollback(
            body.segment, to=body.to, actor=actor(operator), reason=body.reason
        )
    )
    adapters.kick()
    return RollbackResult(segment=body.segment, active=row.id if row else None)


# --- golden set -------------------------------------------------------------------------------
# The shared file (PREFLOOP_GOLDEN_PATH) is checked for every segment: admins edit it. A
# segment's own file (PREFLOOP_HOME/golden/<segment>.jsonl) is its tenant's operators' to edit.

GoldenSegment = Annotated[
    str | None,
    Query(max_length=64, pattern=SEGMENT_SCHEMA["pattern"], description="a segment's own items"),
]


def _golden_file(
    request: Request,
    settings: Settings,
    operator: Principal,
    segment: str | None,
    write: bool = True,
) -> Path:
    if segment is None:
        if write and operator.role < Role.admin:
            raise PermissionDeniedError(
                "the shared golden set is checked for every tenant's segments: changing it "
                "needs an admin key; name one of your segments (?segment=...) to edit its own "
                "items"
            )
        return settings.golden_file
    _check(request, operator, segment)
    return segment_golden_file(settings, segment)


@router.get("/golden", response_model=GoldenList)
async def list_golden(
    request: Request, settings: SettingsDep, operator: OperatorDep, segment: GoldenSegment = None
) -> GoldenList:
    """The shared golden set, or with `segment` that segment's own items."""
    from trainer.golden import SHIPPED_GOLDEN, load_golden

    path = _golden_file(request, settings, operator, segment, write=False)
    items = await run_in_threadpool(load_golden, path)
    shipped = await run_in_threadpool(load_golden, SHIPPED_GOLDEN)
    return GoldenList(
        data=[i.to_json() for i in items],
        path=str(path),
        shipped=len(shipped),
        include_shipped=settings.golden_include_shipped,
    )


@router.put("/golden/{item_id}", response_model=dict)
async def put_golden(
    request: Request,
    item_id: str,
    body: GoldenItemBody,
    settings: SettingsDep,
    operator: OperatorDep,
    segment: GoldenSegment = None,
) -> dict:
    """Add or replace one item (the regression gate checks every item, greedily): in the
    shared set (admins), or in one of your segments' own sets (`segment`)."""
    from trainer.golden import GoldenError, load_golden, parse_item, save_golden

    path = _golden_file(request, settings, operator, segment)
    raw = {"id": item_id, **body.model_dump(exclude_none=True)}
    try:
        item = parse_item(raw)
    except GoldenError as exc:
        raise InvalidRequestError(str(exc)) from exc

    def write() -> None:
        with _golden_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            items = [i for i in load_golden(path) if i.id != item_id]
            save_golden(path, [*items, item])

    await run_in_threadpool(write)
    return item.to_json()


@router.delete("/golden/{item_id}", response_model=dict)
async def delete_golden(
    request: Request,
    item_id: str,
    settings: SettingsDep,
    operator: OperatorDep,
    segment: GoldenSegment = None,
) -> dict[str, str | bool]:
    from trainer.golden import load_golden, save_golden

    path = _golden_file(request, settings, operator, segment)

    def remove() -> bool:
        with _golden_lock:
            items = load_golden(path)
            kept = [i for i in items if i.id != item_id]
            if len(kept) == len(items):
                return False
            save_golden(path, kept)
            return True

    if not await run_in_threadpool(remove):
        raise NotFoundError(f"no golden item {item_id!r}")
    return {"id": item_id, "deleted": True}
