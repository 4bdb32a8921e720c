"""The one settings object. Nothing else in prefloop reads ``os.environ``.

Every field is an environment variable with the ``PREFLOOP_`` prefix (``PREFLOOP_PORT=9000``),
or a line in a ``.env`` file in the working directory.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.canary import CanaryPolicy
from adapters.gate import GateThresholds
from adapters.registry import Retention
from adapters.watch import WatchConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _listed(value: Any) -> list[str]:
    """A list setting from the environment: a JSON list or comma-separated; blanks dropped."""
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFLOOP_", env_file=".env", extra="ignore", env_nested_delimiter="__"
    )

    # --- where things live
    home: Path = Field(
        default=Path("~/.cache/prefloop"),
        description="Cache for the prepared model, adapters and the default SQLite database.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Empty: a SQLite file `prefloop.db` under PREFLOOP_HOME.",
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        default="FULL",
        description="SQLite `synchronous` pragma (WAL mode). FULL: a commit survives power loss.",
    )

    # --- serving
    host: str = "127.0.0.1"
    port: int = 8000
    engine: Literal["local", "vllm"] = Field(
        default="local",
        description="`local`: the embedded transformers+peft engine; `vllm`: vLLM servers at "
        "PREFLOOP_VLLM_URLS.",
    )
    model: str = Field(
        default="",
        description="HF model directory or hub id. Empty: SmolLM2-135M-Instruct, prepared offline.",
    )
    served_model_name: str = Field(
        default="", description="Name clients use in `model`. Empty: the model directory's name."
    )
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description='Adapters to load at start, JSON `{"name": "/path/to/peft/dir"}`; '
        "clients pick one with `model=name`.",
    )
    device: str = Field(default="auto", description="`auto`, `cpu`, `cuda`, `cuda:1`, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="`auto`: bfloat16 on GPU, float32 on CPU."
    )
    torch_threads: int = Field(default=0, description="Intra-op CPU threads; 0 lets torch pick.")
    log_level: str = "info"
    access_log: bool = Field(
        default=True,
        description="Log every request (uvicorn's access log); costs ~4% of feedback throughput.",
    )

    # --- generation defaults and limits
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=1024, ge=1, description="Largest `max_tokens` accepted.")
    default_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    default_top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_n: int = Field(default=4, ge=1, description="Largest `n` (choices per request).")
    max_messages: int = Field(default=128, ge=1, description="Most messages in one request.")
    max_message_chars: int = Field(default=32_000, ge=1, description="Longest message content.")
    max_stop_sequences: int = Field(default=4, ge=0)
    # 16: on 2 CPU cores a SmolLM2 decode step costs 113 ms for 8 rows and 142 ms for 16
    # (71 -> 113 tok/s); requests join a running batch between steps (continuous batching).
    max_batch: int = Field(
        default=16, ge=1, description="Rows (requests x n) decoded together by the local engine."
    )
    max_queue: int = Field(
        default=32, ge=1, description="Generation requests waiting or running before 503."
    )

    # --- feedback → training pairs (the quality gate of `trainer.quality`)
    pairs_max_user_share: float = Field(
        default=0.2, gt=0.0, le=1.0, description="Most of a compiled batch one user may own."
    )
    pairs_min_batch_for_cap: int = Field(
        default=50, ge=0, description="The per-user cap applies from this batch size on."
    )
    pairs_require_approval: bool = Field(
        default=False, description="New pairs wait as `pending` until an operator approves them."
    )
    pairs_near_dup_threshold: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Token-set Jaccard from which prompts count as near-duplicates; 0 disables.",
    )
    pairs_min_answer_chars: int = Field(default=2, ge=0)
    pairs_max_answer_chars: int = Field(default=8_000, ge=1)
    pairs_edit_weight: float = Field(
        default=1.0, gt=0.0, description="Training weight of operator-edit pairs."
    )

    # --- adapter lifecycle (registry, regression gate, live watch)
    segments: list[str] = Field(
        default_factory=lambda: ["default"],
        description="Adapter lines clients can name in `model` (each learns from its own "
        'feedback), JSON e.g. ["default", "support"]; the base model\'s name is `default`.',
    )
    adapters_path: str = Field(
        default="",
        description="Where adapter versions are stored; replicas must share it. "
        "Empty: PREFLOOP_HOME/adapters.",
    )
    golden_path: str = Field(
        default="",
        description="The operator's golden set (JSONL), checked with the shipped one. Empty: "
        "PREFLOOP_HOME/golden.jsonl. Per segment, PREFLOOP_HOME/golden/<segment>.jsonl adds more.",
    )
    golden_include_shipped: bool = Field(
        default=True,
        description="Check the shipped golden set (113 short factual and safety items) too; an "
        "operator's item with the same id replaces a shipped one. False: only the operator's.",
    )
    rehearsal_path: str = Field(
        default="",
        description="Prompts a refresh rehearses (the trainer's rehearsal, on by default; JSONL "
        '{"prompt": ...}). Empty: PREFLOOP_HOME/rehearsal.jsonl if it exists, else the '
        "trainer's own set.",
    )
    eval_max_new_tokens: int = Field(
        default=64, ge=1, description="Answer length for the gate's golden and canary prompts."
    )
    adapter_poll_seconds: float = Field(
        default=0.5,
        gt=0.0,
        description="How often each replica reads the active versions (promotions elsewhere).",
    )
    adapter_keep_retired: int = Field(
        default=3, ge=0, description="Retired versions per segment whose files are kept."
    )
    adapter_rejected_grace_hours: float = Field(
        default=72.0, ge=0.0, description="Rejected versions' files are deleted after this."
    )
    gate: GateThresholds = Field(
        default_factory=GateThresholds,
        description="Regression gate thresholds, e.g. PREFLOOP_GATE__MAX_KL=0.5.",
    )
    gate_segments: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per-segment gate thresholds over `gate`, JSON "
        '{"support": {"max_kl": 2.0}}. A segment meant to learn a phrase the base model never '
        "writes (a sign-off) needs a larger KL budget: each such token costs 5-12 nats.",
    )
    watch: WatchConfig = Field(
        default_factory=WatchConfig,
        description="Live watch (automatic rollback), e.g. PREFLOOP_WATCH__MIN_VOTES=50.",
    )
    watch_interval_seconds: float = Field(
        default=10.0,
        ge=0.0,
        description="How often the live watch (and the canary decision loop) runs; 0 turns it off.",
    )
    canary_share: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="A refresh whose candidate passes the gate serves it to this share of the "
        "segment's users (a live canary) instead of promoting it; 0: promote at once.",
    )
    canary: CanaryPolicy = Field(
        default_factory=CanaryPolicy,
        description="The live canary's test, e.g. PREFLOOP_CANARY__MARGIN=0.02, "
        "PREFLOOP_CANARY__MIN_OUTCOMES=100.",
    )

    # --- the refresh loop (scheduler, one refresh)
    refresh_enabled: bool = Field(
        default=True, description="Run the scheduler inside `prefloop serve`."
    )
    refresh_cron: str = Field(
        default="0 3 * * *", description="When the scheduled refresh runs (crontab syntax)."
    )
    refresh_timezone: str = Field(default="UTC", description="Timezone of `refresh_cron`.")
    refresh_threshold_pairs: int = Field(
        default=200,
        ge=1,
        description="Refresh early once this many approved items (pairs and lone thumbs) wait.",
    )
    refresh_min_interval_minutes: float = Field(
        default=60.0, ge=0.0, description="The threshold trigger fires at most this often."
    )
    refresh_check_seconds: float = Field(
        default=60.0, gt=0.0, description="How often the threshold trigger compiles and counts."
    )
    refresh_min_pairs: int = Field(
        default=16,
        ge=1,
        description="Fewer approved training items (pairs, lone thumbs): the refresh is skipped.",
    )
    refresh_match_window_hours: float | None = Field(
        default=168.0,
        ge=0.0,
        description="Lone thumbs up and down on the same question, rated at most this many hours "
        "apart by different users, train as a matched pair (null: never matched).",
    )
    refresh_heldout_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="Pairs held out for the gate, not trained on."
    )
    refresh_auto_promote: bool = Field(
        default=True, description="Promote a candidate the gate approves (else: wait)."
    )
    refresh_lease_seconds: float = Field(
        default=120.0, gt=0.0, description="A crashed refresh's lease expires after this."
    )
    refresh_train: dict[str, Any] = Field(
        # Rehearsal 1 against forgetting: on SmolLM2's concise users it kept every golden item
        # (4 of 113 lost without it) for answers 46% shorter instead of 67% (README). Batch 4:
        # a refresh often has only ~40 pairs, and 10 steps of 8 moved answers -28% or -35% by
        # the seed alone; 20 steps of 4 moved them -45% to -56% over three seeds.
        default_factory=lambda: {
            "lr": 2e-4,
            "epochs": 2,
            "batch_size": 4,
            "eval_fraction": 0.0,
            "rehearsal": 1.0,
        },
        description='Trainer options (`prefloop train -h`) as JSON, e.g. {"lr": 2e-4}.',
    )
    refresh_train_segments: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-segment trainer options over `refresh_train`, JSON "
        '{"support": {"lr": 5e-4, "rpo_alpha": 4.0}}.',
    )

    # --- web front ends (the widget at /widget.js, the console at /console)
    widget_compare_every: int = Field(
        default=0,
        ge=0,
        description="Every Nth user turn in the widget is answered twice (n=2) with a "
        '"which is better?" pick; 0: never.',
    )
    canary_duel_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description='Of the widget\'s "which is better?" turns in a segment that runs a live '
        "canary, this share is a head-to-head: one answer from each arm, in random order, and "
        "the pick is a vote in the experiment; 0: never.",
    )

    # --- trust and safety: keys, limits, poisoning defences, privacy (issue 8)
    auth: Literal["keys", "off"] = Field(
        default="off",
        description="`keys`: every /v1 call needs an API key (`prefloop keys create`). `off`: "
        "development mode, no keys, everyone is an admin of tenant `default`; refused on a "
        "non-loopback host.",
    )
    auth_cache_seconds: float = Field(
        default=5.0, ge=0.0, description="Key lookups are cached this long (a revocation waits)."
    )
    max_body_bytes: int = Field(
        default=1_000_000, ge=1024, description="Largest request body; larger ones get a 413."
    )
    max_upload_bytes: int = Field(
        default=4 * 1024**3,
        ge=1024,
        description="Largest adapter upload (POST /v1/operator/adapters/upload).",
    )
    adapter_import_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Server directories operators may register adapters from by path, "
        "comma-separated. Empty: only uploads (with PREFLOOP_AUTH=off, any directory).",
    )
    rate_limit_requests_per_minute: int = Field(
        default=120, ge=0, description="Per key (dev mode: per client address); 0: no limit."
    )
    rate_limit_visitor_requests_per_minute: int = Field(
        default=20, ge=0, description="Per widget visitor (public keys); 0: no limit."
    )
    rate_limit_address_requests_per_minute: int = Field(
        default=120,
        ge=0,
        description="Per client address, for public keys; 0: no limit. Behind a proxy, let "
        "uvicorn take the address from X-Forwarded-For (FORWARDED_ALLOW_IPS).",
    )
    new_visitors_per_address_per_hour: int = Field(
        default=30,
        ge=0,
        description="New widget visitor ids one client address may get per hour; 0: no limit.",
    )
    visitor_secret: str = Field(
        default="",
        description="Signs widget visitor ids. Empty: a random one kept in PREFLOOP_HOME; set "
        "it (the same on every replica) when replicas do not share that directory.",
    )
    rate_limit_tokens_per_minute: int = Field(
        default=20_000,
        ge=0,
        description="Generated tokens (max_tokens x n, reserved up front) per key per minute; "
        "0: no limit.",
    )
    pairs_max_key_share: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Most of a compiled batch one API key's users may own (a leaked key "
        "inventing users). 1: off; a key often carries a whole app's users.",
    )
    pairs_review_links: bool = Field(
        default=True,
        description="Hold for an operator every item whose preferred answer has a link (spam "
        "is monetised through links), even when approval is off.",
    )
    pairs_rater_trust: bool = Field(
        default=True,
        description="Weight each item by its rater's agreement with the majority on answers "
        "several users rated.",
    )
    pairs_min_rater_trust: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Items of raters trusted less are excluded."
    )
    retention_days: float = Field(
        default=0.0,
        ge=0.0,
        description="Conversations older than this are deleted (their feedback too; compiled "
        "pairs stay). 0: kept forever.",
    )
    metrics_token: str = Field(
        default="",
        description="`/metrics` needs `Authorization: Bearer <this>`. Empty: with "
        "PREFLOOP_AUTH=keys an admin key, in development mode nothing.",
    )
    metrics_cache_seconds: float = Field(
        default=15.0,
        ge=0.0,
        description="The database gauges of `/metrics` are read at most this often.",
    )
    interrupted_after_minutes: float = Field(
        default=30.0,
        gt=0.0,
        description="At start-up, completions still `running` that began longer ago than this "
        "were cut off by a crash, and are marked failed.",
    )
    failpoint: str = Field(
        default="",
        description="Crash tests only: `refresh:<step>` SIGKILLs this process when a refresh "
        "reaches that step (compile, select, train, register, evaluate, gate, promote).",
    )
    retention_check_minutes: float = Field(
        default=60.0, gt=0.0, description="How often the retention purge runs in `serve`."
    )
    refresh_train_timeout_minutes: float = Field(
        default=240.0, gt=0.0, description="A training subprocess running longer is killed."
    )
    segment_tenants: dict[str, str] = Field(
        default_factory=dict,
        description='Which tenant owns each segment, JSON {"support": "acme"}; segments not '
        "named belong to tenant `default`.",
    )

    # --- the vLLM engine (PREFLOOP_ENGINE=vllm: service.engines.vllm; `prefloop dev vllm`)
    vllm_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8001"],
        description="vLLM replicas, comma-separated: http://gpu1:8000,http://gpu2:8000.",
    )
    vllm_model: str = Field(
        default="", description="The base model's name in vLLM. Empty: what the replicas serve."
    )
    vllm_adapters_path: str = Field(
        default="",
        description="Where the vLLM hosts see the adapter store (a shared volume mounted "
        "elsewhere). Empty: the same path as the gateway's.",
    )
    vllm_connect_timeout_seconds: float = Field(default=2.0, gt=0.0)
    vllm_read_timeout_seconds: float = Field(
        default=120.0,
        gt=0.0,
        description="Longest silence from vLLM before a 504: between two tokens of a stream, "
        "or for the whole answer when the client does not stream.",
    )
    vllm_max_connections: int = Field(default=256, ge=1, description="httpx pool size.")
    vllm_health_seconds: float = Field(
        default=1.0, gt=0.0, description="How often replicas are checked (restarts, sleep)."
    )
    vllm_sleep_during_refresh: bool = Field(
        default=False,
        description="Put vLLM to sleep (POST /sleep) while a refresh trains and evaluates on "
        "its GPU; the gateway answers 503 with Retry-After meanwhile.",
    )
    vllm_sleep_retry_after_seconds: int = Field(default=30, ge=1)
    vllm_venv: str = Field(
        default="", description="`prefloop dev vllm`'s virtualenv. Empty: PREFLOOP_HOME/vllm-venv."
    )

    @field_validator("adapter_import_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        return [Path(v).expanduser().resolve() for v in _listed(value)]

    @field_validator("vllm_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        return [u.rstrip("/") for u in _listed(value)]

    # --- production deployment: migrations, observability, multi-GPU training (#9)
    db_auto_upgrade: bool = Field(
        default=True,
        description="At start-up, apply pending migrations that only add (a fresh database "
        "gets every one); others wait for `prefloop db upgrade`.",
    )
    log_json: bool = Field(
        default=False,
        description="One JSON object per log line (with the request id), for log collectors.",
    )
    refresh_train_nproc: int = Field(
        default=1,
        ge=1,
        description="Processes (GPUs) a refresh trains with; above 1 it runs under "
        "`torchrun --nproc-per-node N` (DDP).",
    )

    # --- a refresh's training on a Kubernetes cluster (docs/cluster.md)
    refresh_launcher: Literal["local", "kubernetes", "local-job"] = Field(
        default="local",
        description="Where a refresh trains. `local`: a subprocess here (`python -m trainer`, or "
        "torchrun with PREFLOOP_REFRESH_TRAIN_NPROC). `kubernetes`: an indexed Job of "
        "PREFLOOP_REFRESH_JOB_NODES pods running torchrun, rendered from "
        "deploy/k8s/train-job.yaml and submitted with kubectl; its files on "
        "PREFLOOP_REFRESH_JOB_VOLUMES. `local-job`: that same Job's pods run here as processes "
        "(to try the path without a cluster).",
    )
    refresh_job_template: str = Field(
        default="",
        description="The training Job's base manifest (a copy of deploy/k8s/train-job.yaml with "
        "your resources, node selection, tolerations). Empty: the shipped one.",
    )
    refresh_job_image: str = Field(
        default="prefloop:cuda",
        description="The training pods' image: the Dockerfile built with a CUDA base.",
    )
    refresh_job_namespace: str = Field(
        default="prefloop", description="The namespace the training Job runs in."
    )
    refresh_job_nodes: int = Field(
        default=1,
        ge=1,
        description="Pods (one per node) of the training Job; torchrun's --nnodes.",
    )
    refresh_job_gpus_per_node: int = Field(
        default=1,
        ge=0,
        description="GPUs (nvidia.com/gpu) each training pod asks for, and processes it starts "
        "(torchrun's --nproc-per-node); 0: one CPU process per pod.",
    )
    refresh_job_volumes: dict[str, str] = Field(
        default_factory=dict,
        description='Shared volumes of the training Job, JSON {"claim": "/mount/path"}: each '
        "PersistentVolumeClaim (ReadWriteMany) is mounted in the pods at the path where this "
        "process sees the same storage. The run's files (PREFLOOP_HOME/runs), the base model "
        "and the adapter store must lie on them. Needed for `kubernetes`.",
    )
    refresh_job_service_account: str = Field(
        default="",
        description="The training pods' service account. Empty: the namespace's default.",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if self.pairs_min_answer_chars > self.pairs_max_answer_chars:
            raise ValueError("pairs_min_answer_chars must not exceed pairs_max_answer_chars")
        if self.refresh_launcher == "kubernetes" and not self.refresh_job_volumes:
            raise ValueError(
                "refresh_launcher kubernetes needs refresh_job_volumes: the shared volumes "
                "through which the training pods read the run's inputs and write the adapter"
            )
        known = {f.name for f in dataclasses.fields(GateThresholds)}
        for segment, overrides in self.gate_segments.items():
            if unknown := sorted(set(overrides) - known):
                raise ValueError(
                    f"gate_segments[{segment!r}]: unknown thresholds {unknown}; "
                    f"known: {sorted(known)}"
                )
        return self

    def gate_for(self, segment: str) -> GateThresholds:
        """The gate's thresholds for one segment: `gate` with the segment's overrides."""
        return dataclasses.replace(self.gate, **self.gate_segments.get(segment, {}))

    def tenant_of(self, segment: str) -> str:
        return self.segment_tenants.get(segment, "default")

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'prefloop.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return (
            Path(self.adapters_path).expanduser()
            if self.adapters_path
            else self.home_dir / "adapters"
        )

    @property
    def golden_file(self) -> Path:
        return (
            Path(self.golden_path).expanduser()
            if self.golden_path
            else self.home_dir / "golden.jsonl"
        )

    @property
    def rehearsal_file(self) -> Path | None:
        """The operator's rehearsal prompts; None: the set shipped with the trainer."""
        if self.rehearsal_path:
            return Path(self.rehearsal_path).expanduser()
        own = self.home_dir / "rehearsal.jsonl"
        return own if own.is_file() else None

    @property
    def retention(self) -> Retention:
        return Retention(
            keep_retired=self.adapter_keep_retired,
            rejected_grace=timedelta(hours=self.adapter_rejected_grace_hours),
        )

    @property
    def vllm_venv_dir(self) -> Path:
        return Path(self.vllm_venv).expanduser() if self.vllm_venv else self.home_dir / "vllm-venv"

    @property
    def uses_default_model(self) -> bool:
        return not self.model

    @property
    def model_name(self) -> str:
        """The id clients put in `model` to reach the base model."""
        if self.served_model_name:
            return self.served_model_name
        if not self.model:
            return DEFAULT_MODEL_NAME
        return Path(self.model.rstrip("/")).name


@lru_cache
def get_settings() -> Settings:
    return Settings()
