"""Metrics (Prometheus, `/metrics`), request ids and JSON logs.

Two kinds of metrics:

- what this process sees, counted as it happens (prometheus-client's Counter, Histogram, Gauge):
  HTTP requests and their latency by route, generations, their latency and tokens by model and
  adapter version, generations in progress (the queue depth), feedback by kind;
- what the database knows, read at scrape time by `DatabaseCollector` with a few grouped
  queries: pairs by status, refresh runs and their durations, gate verdicts, the active adapter
  of each segment, thumbs-up rate per adapter version. These are the same on every replica:
  aggregate them with `max`, not `sum`.

The process-wide metrics live in no global registry; each app builds a `CollectorRegistry` with
them and its own database collector (tests run many apps in one process).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func
from sqlalchemy.engine import Engine as Database
from sqlmodel import Session, col, select

log = logging.getLogger(__name__)

# --- counted in this process ------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "prefloop_http_requests",
    "HTTP requests by method, route template and status code.",
    ["method", "route", "status"],
    registry=None,
)
HTTP_SECONDS = Histogram(
    "prefloop_http_request_duration_seconds",
    "HTTP request latency (a streamed answer: until its last byte).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
GENERATIONS = Counter(
    "prefloop_generations",
    "Chat completions by requested model, adapter version (`base`: none) and final status.",
    ["model", "adapter_version", "status"],
    registry=None,
)
GENERATION_SECONDS = Histogram(
    "prefloop_generation_duration_seconds",
    "Time from a chat turn's start to its stored answer.",
    ["model", "adapter_version"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
    registry=None,
)
TOKENS = Counter(
    "prefloop_tokens",
    "Tokens by model, adapter version and kind (prompt | completion).",
    ["model", "adapter_version", "kind"],
    registry=None,
)
IN_PROGRESS = Gauge(
    "prefloop_generations_in_progress",
    "Chat turns started and not yet finished (queued in or running on the engine).",
    registry=None,
)
FEEDBACK = Counter(
    "prefloop_feedback_events",
    "Feedback signals stored, by kind (thumbs | pick | edit; replays not counted).",
    ["kind"],
    registry=None,
)
PROCESS_METRICS = (
    HTTP_REQUESTS,
    HTTP_SECONDS,
    GENERATIONS,
    GENERATION_SECONDS,
    TOKENS,
    IN_PROGRESS,
    FEEDBACK,
)


def generation_started() -> None:
    IN_PROGRESS.inc()


def generation_finished(completion: Any) -> None:
    """Count a finished chat turn (a stored `Completion` row, whatever its status)."""
    IN_PROGRESS.dec()
    labels = (completion.model, completion.adapter_version or "base")
    GENERATIONS.labels(*labels, completion.status).inc()
    if completion.latency_ms is not None:
        GENERATION_SECONDS.labels(*labels).observe(completion.latency_ms / 1000)
    if completion.prompt_tokens:
        TOKENS.labels(*labels, "prompt").inc(completion.prompt_tokens)
    if completion.completion_tokens:
        TOKENS.labels(*labels, "completion").inc(completion.completion_tokens)


# --- read from the database at scrape time ----------------------------------------------------
class DatabaseCollector(Collector):
    """Gauges and counts the database already holds; a few grouped queries per scrape."""

    def __init__(self, db: Database, cache_seconds: float = 0.0):
        self.db = db
        # Grouped queries over whole tables: a scrape (or many scrapers at once) reads them at
        # most once per `cache_seconds`; concurrent scrapes wait for the one reading.
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, list[Metric]] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, self._read())
            return iter(self._cached[1])

    def _read(self) -> list[Metric]:
        ok = GaugeMetricFamily(
            "prefloop_db_metrics_up", "1 if the database metrics below could be read."
        )
        metrics: list[Metric] = []
        try:
            with Session(self.db) as s:
                metrics = list(self._collect(s))
            ok.add_metric([], 1)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database did
            log.exception("reading metrics from the database failed")
            metrics = []
            ok.add_metric([], 0)
        return [*metrics, ok]

    def _collect(self, s: Session) -> Iterator[Metric]:
        yield _pairs(s)
        yield _runs(s)
        yield from _run_durations(s)
        yield _verdicts(s)
        yield _active_versions(s)
        yield from _thumbs(s)


def _pairs(s: Session) -> Metric:
    from service.storage.tables import PreferencePair

    pairs = GaugeMetricFamily(
        "prefloop_pairs",
        "Stored training pairs by segment and status.",
        labels=["segment", "status"],
    )
    for segment, status, n in s.exec(
        select(PreferencePair.segment, PreferencePair.status, func.count()).group_by(
            PreferencePair.segment, PreferencePair.status
        )
    ):
        pairs.add_metric([segment, status], n)
    return pairs


def _runs(s: Session) -> Metric:
    from service.storage.tables import TrainingRun

    runs = CounterMetricFamily(
        "prefloop_refresh_runs",
        "Refresh runs by segment and status.",
        labels=["segment", "status"],
    )
    for segment, status, n in s.exec(
        select(TrainingRun.segment, TrainingRun.status, func.count()).group_by(
            TrainingRun.segment, TrainingRun.status
        )
    ):
        runs.add_metric([segment, status], n)
    return runs


def _run_durations(s: Session) -> Iterator[Metric]:
    from adapters.registry import as_utc
    from service.storage.tables import TrainingRun

    # Durations in Python: datetime arithmetic differs between SQLite and Postgres, and
    # there are a few runs a day.
    spans: dict[str, list[float]] = {}
    last: dict[str, tuple[datetime, float]] = {}
    for segment, started, finished in s.exec(
        select(TrainingRun.segment, TrainingRun.started_at, TrainingRun.finished_at).where(
            col(TrainingRun.started_at).is_not(None), col(TrainingRun.finished_at).is_not(None)
        )
    ):
        seconds = (as_utc(finished) - as_utc(started)).total_seconds()
        spans.setdefault(segment, []).append(seconds)
        if segment not in last or as_utc(finished) > last[segment][0]:
            last[segment] = (as_utc(finished), seconds)
    durations = SummaryMetricFamily(
        "prefloop_refresh_duration_seconds",
        "Wall time of finished refresh runs.",
        labels=["segment"],
    )
    latest = GaugeMetricFamily(
        "prefloop_refresh_last_duration_seconds",
        "Wall time of the latest finished refresh run.",
        labels=["segment"],
    )
    for segment, values in spans.items():
        durations.add_metric([segment], count_value=len(values), sum_value=sum(values))
        latest.add_metric([segment], last[segment][1])
    yield durations
    yield latest


def _verdicts(s: Session) -> Metric:
    from adapters.registry import AdapterVersion

    verdicts = CounterMetricFamily(
        "prefloop_gate_verdicts",
        "Gate verdicts on adapter versions, by segment and verdict.",
        labels=["segment", "verdict"],
    )
    counts: dict[tuple[str, str], int] = {}
    for segment, verdict in s.exec(
        select(AdapterVersion.segment, AdapterVersion.verdict).where(
            col(AdapterVersion.verdict).is_not(None)
        )
    ):
        if not verdict:  # approved by hand: no gate ran (a JSON null is not SQL NULL)
            continue
        key = (segment, "approved" if verdict.get("approved") else "rejected")
        counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        verdicts.add_metric(list(key), n)
    return verdicts


def _active_versions(s: Session) -> Metric:
    from adapters.registry import ACTIVE, AdapterVersion

    active = GaugeMetricFamily(
        "prefloop_active_adapter_version",
        "The version number each segment serves (absent: the base model); the `version` "
        "label names it.",
        labels=["segment", "version"],
    )
    for segment, vid, number in s.exec(
        select(AdapterVersion.segment, AdapterVersion.id, AdapterVersion.version).where(
            AdapterVersion.status == ACTIVE
        )
    ):
        active.add_metric([segment, vid], number)
    return active


def _thumbs(s: Session) -> Iterator[Metric]:
    from service.storage.tables import Completion, Feedback

    votes = CounterMetricFamily(
        "prefloop_thumbs",
        "Current thumbs votes by the adapter version that wrote the answer and vote.",
        labels=["adapter_version", "vote"],
    )
    rate = GaugeMetricFamily(
        "prefloop_thumbs_up_ratio",
        "Share of thumbs-up among the current votes, per adapter version (`base`: none).",
        labels=["adapter_version"],
    )
    for version, up, total in s.exec(
        select(
            Completion.adapter_version,
            func.sum(case((col(Feedback.value) > 0, 1), else_=0)),
            func.count(),
        )
        .join(Completion, col(Completion.id) == col(Feedback.completion_id))
        .where(Feedback.kind == "thumbs")
        .group_by(Completion.adapter_version)
    ):
        name = version or "base"
        votes.add_metric([name, "up"], int(up))
        votes.add_metric([name, "down"], int(total) - int(up))
        rate.add_metric([name], int(up) / int(total))
    yield votes
    yield rate


def build_registry(db: Database, cache_seconds: float = 0.0) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    for metric in PROCESS_METRICS:
        registry.register(metric)
    registry.register(DatabaseCollector(db, cache_seconds))
    return registry


# --- request ids and the HTTP middleware ------------------------------------------------------
request_id: ContextVar[str | None] = ContextVar("prefloop_request_id", default=None)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestMiddleware:
    """Pure ASGI (no per-request task, streaming untouched): takes the client's `X-Request-ID`
    (or makes one), makes it the logs' `request_id`, returns it in the response, and counts the
    request by its route template (not its path, which would make a series per id)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                rid = text if _CLIENT_ID.match(text) else None
                break
        rid = rid or uuid.uuid4().hex
        token = request_id.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)
            request_id.reset(token)


# --- logging ----------------------------------------------------------------------------------
class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, *, json_lines: bool) -> None:
    """The root handler every prefloop process logs through; JSON lines when asked."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler logs every run of every job at INFO: two lines a minute for the threshold check
    # alone, which bury what a newcomer needs to see. Its warnings and errors still show, and
    # PREFLOOP_LOG_LEVEL=debug shows everything.
    if root.level > logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    if json_lines:
        # transformers logs through a handler of its own and draws progress bars on stderr:
        # send its records through ours, and draw no bars (a collector would get half-lines).
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
        # torch too ("W1206 12:57:21 ... _pytree.py" lines, e.g. when torchao is installed):
        # its records go through ours. The engines import torch anyway.
        import torch  # noqa: F401 - sets up the "torch" logger's own handler

        torch_log = logging.getLogger("torch")
        torch_log.handlers.clear()
        torch_log.propagate = True
        # Python warnings (a library's FutureWarning) print raw lines on stderr: log them.
        logging.captureWarnings(True)
