"""Request and response models of prefloop's own endpoints: feedback and the operator queue.

(The OpenAI-compatible ones are in `protocol.py`.) Requests refuse unknown fields: these are our
own APIs, so a misspelt field is a client bug worth a 400, not something to ignore.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from adapters.registry import as_utc

# The registry's rule for segment names, stated in the schema; the registry's own check gives
# the clearer error ("segment 'A B' is not valid: use ...").
SEGMENT_SCHEMA = {"pattern": r"^[a-z0-9][a-z0-9_-]{0,63}$"}

# --- feedback -----------------------------------------------------------------------------


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(max_length=128, description="The chat response's `id`.")
    comment: str | None = Field(default=None, max_length=4000)
    user: str | None = Field(
        default=None,
        max_length=256,
        description="Who gives the feedback (as OpenAI's `user`); default: the completion's user.",
    )


class ThumbsFeedback(_FeedbackBase):
    type: Literal["thumbs"] = "thumbs"
    # Strict: `true` is no rating. The enum tells the schema's readers (and the fuzzer).
    rating: Annotated[int, Field(strict=True, json_schema_extra={"enum": [1, -1]})] = Field(
        description="1 (thumbs up) or -1 (thumbs down)"
    )
    choice_index: int = Field(default=0, ge=0, description="Which choice of an `n>1` response.")

    @field_validator("rating")
    @classmethod
    def _plus_minus_one(cls, v: int) -> int:
        if v not in (1, -1):
            raise ValueError("rating must be 1 (thumbs up) or -1 (thumbs down)")
        return v


class PickFeedback(_FeedbackBase):
    type: Literal["pick"]
    chosen_index: int = Field(ge=0, description="The better choice of an `n=2` response.")


class EditFeedback(_FeedbackBase):
    type: Literal["edit"]
    text: str = Field(max_length=32_000, description="The ideal answer.")
    choice_index: int = Field(default=0, ge=0)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an edit needs the ideal answer's text; it is empty")
        return v


def _feedback_type(v: Any) -> str:
    # "thumbs" is the default type, so the tag may be missing (pydantic's plain discriminator
    # requires it). Tags are spelt "type=..." so the error handler can leave them out of
    # `param` (a client sent `rating`, not `thumbs.rating`).
    raw = v.get("type", "thumbs") if isinstance(v, dict) else getattr(v, "type", "thumbs")
    return f"type={raw}" if raw in ("thumbs", "pick", "edit") else "type=thumbs"


FeedbackRequest = Annotated[
    Annotated[ThumbsFeedback, Tag("type=thumbs")]
    | Annotated[PickFeedback, Tag("type=pick")]
    | Annotated[EditFeedback, Tag("type=edit")],
    Discriminator(_feedback_type),
]


class FeedbackPublic(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    type: str
    completion_id: str
    message_id: str
    choice_index: int
    user: str
    value: int  # thumbs: ±1; pick: the chosen index; edit: 0
    comment: str | None
    text: str | None  # edit: the ideal answer
    author_role: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Any, **extra: Any) -> Self:
        """A stored feedback (a `Feedback`, or a `feedback` table row) as the API shows it."""
        return cls(
            id=row.id,
            type=row.kind,
            completion_id=row.completion_id,
            message_id=row.message_id,
            choice_index=row.choice_index,
            user=row.user_id,
            value=row.value,
            comment=row.comment,
            text=row.edited_text,
            author_role=row.author_role,
            created_at=as_utc(row.created_at),
            updated_at=as_utc(row.updated_at),
            **extra,
        )


class FeedbackQueueItem(FeedbackPublic):
    """A feedback row as the operator queue shows it: with the answer it is about."""

    segment: str
    adapter_version: str | None
    prompt: str  # the last prompt message (what the answer answered)
    answer: str  # the rated / picked / edited answer


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackQueueItem]
    has_more: bool


# --- pairs and operator actions -------------------------------------------------------------


class PairPublic(BaseModel):
    id: str
    object: Literal["preference_pair"] = "preference_pair"
    key: str
    kind: str
    tenant: str
    segment: str
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str | None
    label: bool | None
    source: str
    weight: float
    status: str
    excluded_reason: str | None
    provenance: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class PairList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PairPublic]
    has_more: bool


PairActionName = Literal["approve", "exclude", "flip", "replace_chosen"]


class PairAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, max_length=32_000, description="replace_chosen only")
    operator: str | None = Field(default=None, max_length=256, description="overrides X-Operator")


class BulkPairAction(PairAction):
    action: PairActionName
    ids: list[str] = Field(min_length=1, max_length=1000)


class PairActionResult(BaseModel):
    object: Literal["operator_action"] = "operator_action"
    id: str
    action: str
    actor: str
    data: list[PairPublic]


class CompileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operator: str | None = Field(default=None, max_length=256)


class CompileSummary(BaseModel):
    object: Literal["compile_summary"] = "compile_summary"
    stored: dict[str, int]  # by status: approved / pending / excluded
    pairs: int  # new DPO pairs accepted
    unpaired: int  # new KTO rows accepted
    excluded: int
    dropped: dict[str, int]  # DropReason → count
    redactions: dict[str, int]
    answers: int  # answers considered
    feedback: int  # feedback rows considered


# --- adapters ---------------------------------------------------------------------------------


class AdapterPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    segment: str
    version: int
    status: str
    status_reason: str | None
    content_hash: str
    path: str
    base_model: str
    parent: str | None
    previous: str | None
    created_at: datetime
    status_changed_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None
    files_deleted_at: datetime | None
    verdict: dict[str, Any] | None = None


class AdapterEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version_id: str
    from_status: str | None
    to_status: str
    actor: str
    reason: str | None
    created_at: datetime


class AdapterDetail(AdapterPublic):
    manifest: dict[str, Any]
    eval_report: dict[str, Any] | None
    events: list[AdapterEventPublic]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterPublic]
    serving: dict[str, str] = Field(description="segment -> the version this replica serves")
    load_errors: dict[str, str] = Field(default_factory=dict)


class RegisterAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(max_length=4096, description="A PEFT adapter directory on the server.")
    segment: str = Field(default="default", max_length=64, json_schema_extra=SEGMENT_SCHEMA)
    parent: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, max_length=2000)


class AdapterAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=2000)


class PromoteRequest(AdapterAction):
    expect_active: str | None = Field(
        default=None,
        max_length=128,
        description='The version you expect to replace ("base": the base model). If another '
        "is active by then, nothing changes and the answer is 409 promotion_conflict.",
    )


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segment: str = Field(default="default", max_length=64, json_schema_extra=SEGMENT_SCHEMA)
    to: str | None = Field(default=None, max_length=128, description="Default: its predecessor.")
    reason: str | None = Field(default=None, max_length=2000)


# --- live canaries (experiments) --------------------------------------------------------------


class StartExperiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(max_length=128, description="An approved version id, e.g. default@v4.")
    share: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="The share of the segment's end users served the candidate (sticky per "
        "user). Default: PREFLOOP_CANARY_SHARE.",
    )
    policy: dict[str, float] | None = Field(
        default=None,
        description="Overrides of the test's policy (PREFLOOP_CANARY__*): margin, alpha, "
        "min_outcomes, max_outcomes, max_hours.",
    )
    expect_incumbent: str | None = Field(
        default=None,
        max_length=128,
        description='The version you expect the candidate to compete with ("base": the base '
        "model). If another is active, nothing starts and the answer is 409.",
    )


class ExperimentAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=2000)


class ExperimentPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant: str
    segment: str
    candidate: str
    incumbent: str | None = Field(description="None: the base model.")
    share: float
    policy: dict[str, Any]
    status: Literal["running", "promoted", "rolled_back", "stopped"]
    reason: str | None = Field(description="Why it ended; while running, the last look's word.")
    snapshot: dict[str, Any] | None = Field(description="The last look's counts and interval.")
    created_by: str
    ended_by: str | None
    started_at: datetime
    decided_at: datetime | None
    ended_at: datetime | None


class ExperimentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExperimentPublic]


class ArmPublic(BaseModel):
    arm: Literal["candidate", "incumbent"]
    version: str | None = Field(description="None: the base model.")
    answers: int
    up: int
    down: int
    regenerated: int
    won: int = Field(0, description="Head-to-head picks of this arm's answer over the other's.")
    lost: int = Field(0, description="Head-to-head picks of the other arm's answer over this.")
    rate: float = Field(description="The rate the test compares (see `decision.outcomes`).")


class DecisionPublic(BaseModel):
    action: Literal["continue", "promote", "rollback", "stop"]
    reason: str
    candidate_rate: float
    incumbent_rate: float
    difference: float
    interval: tuple[float, float] = Field(
        description="Always-valid confidence interval of candidate - incumbent."
    )
    outcomes: tuple[int, int]


class ExperimentDetail(ExperimentPublic):
    arms: list[ArmPublic]
    decision: DecisionPublic = Field(
        description="The test on the counts now (up to the end for an ended experiment)."
    )
    elapsed_hours: float


class RollbackResult(BaseModel):
    segment: str
    active: str | None = Field(description="The version now active; null: the base model.")


class GoldenItemBody(BaseModel):
    """One golden-set item; validated by `trainer.golden.parse_item`."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    checks: dict[str, Any]


class GoldenList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]  # the operator's items (the file at `path`)
    path: str
    # The shipped set the gate checks too (unless PREFLOOP_GOLDEN_INCLUDE_SHIPPED=false); an
    # operator's item with a shipped id replaces that item.
    shipped: int = 0
    include_shipped: bool = True


# --- console charts --------------------------------------------------------------------------


class RatePoint(BaseModel):
    t: datetime  # the bucket's start
    up: int
    down: int
    rate: float  # up / (up + down)


class RateSeries(BaseModel):
    version: str  # an adapter version id, or "base" for the base model
    points: list[RatePoint]


class ThumbsRate(BaseModel):
    object: Literal["thumbs_rate"] = "thumbs_rate"
    segment: str | None
    bucket_seconds: int
    since: datetime
    data: list[RateSeries]


# --- refresh runs -----------------------------------------------------------------------------


class RunPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    segment: str
    trigger: str
    actor: str
    status: str
    outcome: str | None
    stage: str | None
    steps: list[dict[str, Any]]
    progress: dict[str, Any]
    counts: dict[str, Any]
    verdict: dict[str, Any] | None
    parent_version: str | None
    candidate_version: str | None
    error: str | None
    cancel_requested: bool
    holder: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunDetail(RunPublic):
    log: str


class RunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RunPublic]
    has_more: bool


class DayCount(BaseModel):
    day: date  # a UTC day
    thumbs_up: int = 0
    thumbs_down: int = 0
    picks: int = 0
    edits: int = 0


class Overview(BaseModel):
    """The console's landing page: the last `days` UTC days of feedback, what waits for an
    operator's review, and the last refresh (null: none yet)."""

    object: Literal["operator_overview"] = "operator_overview"
    since: datetime  # the first day's start
    days: int
    feedback_per_day: list[DayCount]  # every day, oldest first
    thumbs_rate: list[RateSeries]  # per adapter version ("base": the base model), per day
    pending_pairs: int  # pairs waiting for approval
    pending_unpaired: int  # lone thumbs (KTO rows) waiting for approval
    last_run: RunPublic | None


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segment: str = Field(default="default", max_length=64, json_schema_extra=SEGMENT_SCHEMA)


# --- privacy ----------------------------------------------------------------------------------


class UserDeleted(BaseModel):
    object: Literal["user.deleted"] = "user.deleted"
    user: str
    tenant: str
    conversations: int
    messages: int
    completions: int
    feedback: int
    pairs: int
