"""Operator API for live canaries (`service.loop.live_watch`): start one, watch its arms and the
test, stop, promote or roll back by hand. An operator sees its tenant's experiments only: another
tenant's are 404s, like its segments and versions."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from adapters import canary as stats
from adapters.registry import expected
from service.api.deps import DbDep, OperatorDep, RouterDep, SettingsDep, actor
from service.api.schemas import (
    ArmPublic,
    DecisionPublic,
    ExperimentAction,
    ExperimentDetail,
    ExperimentList,
    ExperimentPublic,
    StartExperiment,
)
from service.core.errors import NotFoundError
from service.core.identity import Principal
from service.loop import live_watch
from service.storage.tables import Experiment

router = APIRouter(prefix="/v1/operator", tags=["experiments"])


async def _visible(db: DbDep, experiment_id: str, operator: Principal) -> Experiment:
    exp = await run_in_threadpool(live_watch.get, db, experiment_id)
    if not operator.sees_tenant(exp.tenant):
        raise NotFoundError(f"no experiment {experiment_id!r}", code="experiment_not_found")
    return exp


def _detail(db: DbDep, exp: Experiment) -> ExperimentDetail:
    decision, snap = live_watch.look(db, exp)
    arms = []
    for name, version in (("candidate", exp.candidate), ("incumbent", exp.incumbent)):
        arm = stats.ArmStats(**snap[name])
        wins, trials = stats.outcomes(arm)
        rate = wins / trials if trials else 0.0
        arms.append(ArmPublic(arm=name, version=version, rate=rate, **snap[name]))
    return ExperimentDetail(
        **ExperimentPublic.model_validate(exp).model_dump(),
        arms=arms,
        decision=DecisionPublic(**{k: getattr(decision, k) for k in DecisionPublic.model_fields}),
        elapsed_hours=snap["elapsed_hours"],
    )


@router.get("/experiments", response_model=ExperimentList)
async def list_experiments(
    db: DbDep,
    operator: OperatorDep,
    segment: str | None = None,
    status: Literal["running", "promoted", "rolled_back", "stopped"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> ExperimentList:
    """Experiments, newest first."""
    rows = await run_in_threadpool(
        lambda: live_watch.list_experiments(
            db, tenant=operator.scope, segment=segment, status=status, limit=limit
        )
    )
    return ExperimentList(data=[ExperimentPublic.model_validate(r) for r in rows])


@router.post("/experiments", response_model=ExperimentPublic, status_code=201)
async def start_experiment(
    request: Request,
    body: StartExperiment,
    db: DbDep,
    settings: SettingsDep,
    operator: OperatorDep,
    adapters: RouterDep,
) -> ExperimentPublic:
    """Serve an approved candidate to a sticky share of its segment's users beside the active
    version; the decision loop promotes or rolls it back on their feedback. 409: the candidate
    is not approved, the segment already runs one, or the incumbent is not `expect_incumbent`."""
    if not operator.sees_tenant(settings.tenant_of(body.candidate.split("@")[0])):
        raise NotFoundError(f"no adapter version {body.candidate!r}", code="adapter_not_found")
    exp = await run_in_threadpool(
        lambda: live_watch.start(
            db,
            request.app.state.registry,
            settings,
            candidate=body.candidate,
            actor=actor(operator),
            share=body.share,
            policy=body.policy,
            expect_incumbent=...
            if body.expect_incumbent is None
            else expected(body.expect_incumbent),
        )
    )
    adapters.kick()  # load the candidate and split now, not at the next poll
    return ExperimentPublic.model_validate(exp)


@router.get("/experiments/{experiment_id}", response_model=ExperimentDetail)
async def show_experiment(experiment_id: str, db: DbDep, operator: OperatorDep) -> ExperimentDetail:
    """The arms (answers, thumbs, regenerations, rates), the test's interval and decision."""
    exp = await _visible(db, experiment_id, operator)
    return await run_in_threadpool(_detail, db, exp)


@router.post("/experiments/{experiment_id}/{action}", response_model=ExperimentPublic)
async def end_experiment(
    request: Request,
    experiment_id: str,
    action: Literal["stop", "promote", "rollback"],
    db: DbDep,
    operator: OperatorDep,
    adapters: RouterDep,
    body: ExperimentAction | None = None,
) -> ExperimentPublic:
    """End a running experiment now: `stop` (the incumbent stays), `promote` the candidate
    (fenced on the incumbent) or `rollback` (reject the candidate). 409 once it has ended."""
    exp = await _visible(db, experiment_id, operator)
    ended = await run_in_threadpool(
        lambda: live_watch.act(
            db,
            request.app.state.registry,
            exp.id,
            action,
            actor=actor(operator),
            reason=body.reason if body else None,
        )
    )
    adapters.kick()
    return ExperimentPublic.model_validate(ended)
