"""Refreshes on a tiny model through the real HTTP API: a run goes compile -> train (subprocess)
-> register -> evaluate (subprocess) -> gate -> promote, recorded step by step; runs with
nothing to do are skipped, a failing one leaves the active adapter alone, a cancelled one stops
its subprocess, the lease keeps refreshes apart, and the triggers fire when they should."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlmodel import Session, select

from adapters.registry import Registry
from service.core.config import Settings
from service.loop.lease import acquire_lease, release_lease, renew_lease
from service.loop.refresh import run_refresh
from service.loop.runs import create_run
from service.loop.scheduler import Refresher
from service.storage.db import init_db, make_engine
from service.storage.tables import OperatorAction, PreferencePair, TrainingRun
from tests.conftest import BOTH_DATABASES
from tests.service.conftest import Live
from trainer.rehearsal import REHEARSAL_PROMPTS

OPS = {"X-Operator": "olga"}
LENIENT_GATE = {  # the tiny random model is no judge of quality: let every candidate through
    "min_pairs": 1000,  # skips the pair checks
    "max_kl": 1e9,
    "max_new_link_answers": 10**6,  # random tokens may spell a domain now and then
    "max_length_ratio": 1e9,
    "min_length_ratio": 0.0,
    "max_repetition": 1.0,
    "repetition_tolerance": 1.0,  # random text: its repetition vs the incumbent's is a coin toss
}
FAST = {
    "refresh_enabled": False,
    # The hold-out is a hash of each pair's (sampled) text: 8 pairs leave fewer than 4 to train
    # on 2.7% of the time, which skipped runs meant to fail or be cancelled. 2 of 8: 0.04%.
    "refresh_min_pairs": 2,
    "refresh_heldout_fraction": 0.25,
    "refresh_train": {"lr": 5e-2, "epochs": 1, "batch_size": 4, "max_length": 64,
                      "eval_fraction": 0.0},
    "eval_max_new_tokens": 4,
    "gate": LENIENT_GATE,
    "watch_interval_seconds": 0,
}  # fmt: skip


def picks(live: Live, count: int) -> None:
    """`count` A/B picks on fresh n=2 answers: each becomes one preference pair."""
    for i in range(count):
        answer = live.chat([{"role": "user", "content": f"Question {i}: tell me a thing."}], n=2)
        r = live.feedback(completion_id=answer["id"], type="pick", chosen_index=i % 2, user=f"u{i}")
        assert r.status_code == 201, r.text


def wait_run(live: Live, run_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = live.http.get(f"/v1/operator/runs/{run_id}", headers=OPS).json()
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} still {run['status']} at {run['stage']}")


# Rehearsing the reference's own answers (4 tokens each) to the trainer's prompts.
REHEARSING = {
    **FAST,
    "refresh_train": {**FAST["refresh_train"], "rehearsal": 1.0, "rehearsal_tokens": 4},
    "rehearsal_path": str(REHEARSAL_PROMPTS),
}


@pytest.mark.slow  # trains
@pytest.mark.parametrize(
    "db_backend, settings_overrides",
    [
        ("sqlite", REHEARSING),
        # On Postgres, and trained by two processes under torchrun (DDP, gloo on CPU).
        pytest.param("postgres", {**FAST, "refresh_train_nproc": 2}, marks=pytest.mark.postgres),
    ],
    indirect=["db_backend"],
)
def test_a_refresh_trains_gates_promotes_and_serves(
    live: Live, settings_overrides: dict[str, Any]
) -> None:
    picks(live, 12)
    r = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=OPS)
    assert r.status_code == 202, r.text
    run = wait_run(live, r.json()["id"])
    assert run["status"] == "succeeded", (run["error"], run["log"][-2000:])
    assert run["outcome"] == "promoted", run["verdict"]
    assert [s["name"] for s in run["steps"]] == [
        "compile", "select", "train", "register", "evaluate", "gate", "promote",
    ]  # fmt: skip
    assert all(s["seconds"] is not None for s in run["steps"])
    assert run["steps"][0]["detail"]["new_pairs"] == 12
    counts = run["counts"]
    assert counts["approved"] == 12 and counts["train"] + counts["heldout"] == 12
    assert run["progress"]["step"] == run["progress"]["total"] > 0
    assert "loss" in run["progress"]
    assert run["verdict"]["approved"] is True
    assert run["candidate_version"] == "default@v1" and run["parent_version"] is None
    assert "python" in run["log"] and "trainer train" in run["log"]
    nproc = settings_overrides.get("refresh_train_nproc", 1)
    assert run["steps"][2]["detail"]["processes"] == nproc
    assert ("torch.distributed.run --standalone --nproc-per-node 2" in run["log"]) == (nproc == 2)
    rehearsal = settings_overrides["refresh_train"].get("rehearsal")
    assert ("--rehearsal 1.0" in run["log"]) == bool(rehearsal)
    assert (f"--rehearsal-prompts {REHEARSAL_PROMPTS}" in run["log"]) == bool(rehearsal)

    # Served: the promotion reached the router.
    deadline = time.monotonic() + 5
    while live.chat([{"role": "user", "content": "hi"}])["adapter_version"] != "default@v1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with live.session() as s:
        statuses = {p.status for p in s.exec(select(PreferencePair)).all()}
        used = s.exec(select(PreferencePair)).all()
    assert statuses == {"used"}
    assert {p.provenance["run_id"] for p in used} == {run["id"]}

    # Nothing new: the next refresh is skipped and says why.
    r = live.http.post("/v1/operator/runs", json={}, headers=OPS)
    run = wait_run(live, r.json()["id"])
    assert run["status"] == "skipped"
    assert run["error"] == (
        "0 approved training items in segment 'default' (0 pairs, 0 matched from thumbs, "
        "0 thumbs up and 0 down alone); a refresh needs 2 (PREFLOOP_REFRESH_MIN_PAIRS)"
    )

    # Fresh feedback: a second refresh warm-starts from the active version and replaces it.
    picks(live, 12)
    run = wait_run(live, live.http.post("/v1/operator/runs", headers=OPS).json()["id"])
    assert (run["status"], run["outcome"]) == ("succeeded", "promoted"), run["error"]
    assert run["parent_version"] == "default@v1" and run["candidate_version"] == "default@v2"
    assert "--init-adapter" in run["log"]
    listing = live.http.get("/v1/operator/runs", headers=OPS).json()
    assert [x["status"] for x in listing["data"]] == ["succeeded", "skipped", "succeeded"]


@pytest.mark.slow  # trains
@pytest.mark.parametrize(
    "settings_overrides",
    # Nothing held out and one batch per step (every step sees ups and downs): exact counts.
    [{**FAST, "refresh_heldout_fraction": 0.0,
      "refresh_train": {**FAST["refresh_train"], "batch_size": 32, "epochs": 2}}],
)  # fmt: skip
def test_a_segment_whose_visitors_only_rate_refreshes_on_their_thumbs(live: Live) -> None:
    """Each visitor asks once and rates the one answer it got: no pick, no regeneration. Four
    questions are each asked by three visitors, rated up, up and down in some order (one up and
    the down become a matched pair); twelve more are asked once. Nothing is held out, so the
    counts are exact."""
    for i in range(24):
        question = f"Question {i % 4}: what is a good name for a cat?" if i < 12 else f"Q{i}?"
        answer = live.chat([{"role": "user", "content": question}], user=f"visitor-{i}")
        rating = 1 if i % 3 else -1  # 16 ups, 8 downs; each question above gets one down
        r = live.feedback(completion_id=answer["id"], rating=rating, user=f"visitor-{i}")
        assert r.status_code == 201, r.text
    r = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=OPS)
    run = wait_run(live, r.json()["id"])
    assert (run["status"], run["outcome"]) == ("succeeded", "promoted"), run["error"]
    assert run["counts"] == {
        "approved": 24, "train": 20, "heldout": 0, "pairs": 0, "matched": 4, "thumbs_up": 12,
        "thumbs_down": 4, "heldout_pairs": 0, "heldout_matched": 0, "heldout_thumbs_up": 0,
        "heldout_thumbs_down": 0,
    }  # fmt: skip
    assert [h[0] for h in run["progress"]["history"]] == [1, 2]
    assert all(h[3] is not None for h in run["progress"]["history"]), "the thumbs reward gap"
    version = live.http.get("/v1/operator/adapters/default@v1", headers=OPS).json()
    data = version["manifest"]["data"]
    assert (data["kind"], data["pairs"], data["desirable"], data["undesirable"]) == (
        "mixed", 4, 12, 4
    )  # fmt: skip
    assert data["kto_lambdas"] == [1.0, 2.25], "12 ups to 4 downs: downs weigh up to 4/3"
    with live.session() as s:
        assert {p.status for p in s.exec(select(PreferencePair)).all()} == {"used"}


@BOTH_DATABASES
@pytest.mark.parametrize(
    "settings_overrides",
    [{**FAST, "refresh_heldout_fraction": 0.0, "refresh_train": {"lr": -1.0}}],
    indirect=False,
)
def test_a_failed_refresh_leaves_serving_alone(live: Live) -> None:
    picks(live, 8)
    run = wait_run(live, live.http.post("/v1/operator/runs", headers=OPS).json()["id"])
    assert run["status"] == "failed"
    assert run["stage"] == "train"
    assert "trainer train exited with 2" in run["error"]
    assert "Invalid learning rate: -1.0" in run["error"]
    assert run["candidate_version"] is None
    assert live.http.get("/v1/operator/adapters", headers=OPS).json()["data"] == []
    with live.session() as s:  # the pairs wait for the next refresh
        assert {p.status for p in s.exec(select(PreferencePair)).all()} == {"approved"}


@pytest.mark.slow  # trains
@pytest.mark.parametrize(
    "settings_overrides",
    [{**FAST, "refresh_train": {**FAST["refresh_train"], "epochs": 100_000}}],
    indirect=False,
)
def test_cancel_stops_the_training_subprocess(live: Live) -> None:
    picks(live, 8)
    run_id = live.http.post("/v1/operator/runs", headers=OPS).json()["id"]
    deadline = time.monotonic() + 120
    while True:  # wait until it is training
        run = live.http.get(f"/v1/operator/runs/{run_id}", headers=OPS).json()
        if run["progress"].get("step", 0) >= 1:
            break
        assert time.monotonic() < deadline, run
        time.sleep(0.1)
    r = live.http.post(f"/v1/operator/runs/{run_id}/cancel", headers=OPS)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    # 100000 epochs would train for days: ending at all means the cancel stopped it.
    run = wait_run(live, run_id, timeout=300)
    assert (run["status"], run["stage"]) == ("cancelled", "train")
    assert run["progress"]["step"] < run["progress"]["total"]
    r = live.http.post(f"/v1/operator/runs/{run_id}/cancel", headers=OPS)
    assert r.status_code == 409
    assert live.http.get("/v1/operator/runs/run-nope", headers=OPS).status_code == 404
    assert (
        live.http.post("/v1/operator/runs", json={"segment": "A B"}, headers=OPS).status_code == 400
    )


@BOTH_DATABASES
def test_the_lease_keeps_refreshes_apart(tmp_path, db_url: str) -> None:
    db = make_engine(Settings(database_url=db_url))
    init_db(db)
    assert acquire_lease(db, "replica-a", ttl=60) is None
    assert acquire_lease(db, "replica-a", ttl=60) is None  # its own lease: renewed
    held = acquire_lease(db, "replica-b", ttl=60)
    assert held is not None and held.startswith("replica-a (until ")
    assert renew_lease(db, "replica-a", ttl=60) and not renew_lease(db, "replica-b", ttl=60)

    # A run that finds the lease taken is recorded as skipped, with the holder.
    settings = Settings(home=tmp_path, database_url=db_url)
    registry = Registry(db, tmp_path / "adapters")
    run = create_run(db, segment="default", trigger="manual", actor="t")
    run = run_refresh(settings, db, registry, run.id, holder="replica-b")
    assert run.status == "skipped"
    assert run.error.startswith("another refresh is running (lease held by replica-a")

    # A crashed holder stops renewing: once its lease expires, another takes it.
    assert acquire_lease(db, "replica-a", ttl=-1) is None  # renewed into the past
    assert acquire_lease(db, "replica-b", ttl=60) is None
    release_lease(db, "replica-a")  # not the holder: nothing happens
    assert acquire_lease(db, "replica-a", ttl=60) is not None
    release_lease(db, "replica-b")
    assert acquire_lease(db, "replica-a", ttl=60) is None
    db.dispose()


@pytest.mark.slow  # trains
@pytest.mark.parametrize(
    "settings_overrides",
    [{**FAST, "refresh_threshold_pairs": 6, "refresh_min_interval_minutes": 60}],
    indirect=False,
)
def test_threshold_and_schedule_triggers(live: Live, tmp_path) -> None:
    settings = Settings(
        home=tmp_path, model=str(live.model_dir), database_url=live.db_url,
        **{**FAST, "refresh_threshold_pairs": 6, "refresh_min_interval_minutes": 60},
    )  # fmt: skip
    db = make_engine(settings)
    refresher = Refresher(settings, db, Registry(db, settings.adapters_dir))
    picks(live, 4)
    refresher.check_threshold()  # 4 < 6 waiting: nothing
    with Session(db) as s:
        assert s.exec(select(TrainingRun)).all() == []
        compiles = len(
            s.exec(select(OperatorAction).where(OperatorAction.action == "compile")).all()
        )
    refresher.check_threshold()  # no new signal since: no second compile
    with Session(db) as s:
        again = s.exec(select(OperatorAction).where(OperatorAction.action == "compile")).all()
    assert len(again) == compiles == 1
    picks(live, 4)
    refresher.check_threshold()  # the check compiles the new feedback: 8 waiting
    with Session(db) as s:
        [run] = s.exec(select(TrainingRun)).all()
    assert (run.trigger, run.status, run.outcome) == ("threshold", "succeeded", "promoted")
    picks(live, 8)
    refresher.check_threshold()  # enough pairs again, but within the minimum interval
    with Session(db) as s:
        assert len(s.exec(select(TrainingRun)).all()) == 1

    refresher.scheduled()  # the nightly job does not wait for the threshold
    with Session(db) as s:
        runs = s.exec(select(TrainingRun).order_by(TrainingRun.created_at)).all()
    assert [(r.trigger, r.status) for r in runs] == [
        ("threshold", "succeeded"),
        ("schedule", "succeeded"),
    ]

    refresher.start_schedule()
    job = refresher.scheduler.get_job("scheduled-refresh")
    nxt = job.next_run_time
    assert (nxt.hour, nxt.minute) == (3, 0) and str(nxt.tzinfo) == "UTC"
    refresher.shutdown()
    db.dispose()


@pytest.mark.slow  # trains
@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            **FAST,
            "segments": ["default", "support"],
            # Fleet-wide, no drift at all passes; the support segment has its own KL budget.
            "gate": {**LENIENT_GATE, "max_kl": 0.0},
            "gate_segments": {"support": {"max_kl": 1e9}},
        }
    ],
    indirect=False,
)
def test_each_segment_trains_only_on_its_own_feedback(live: Live) -> None:
    for i in range(8):
        answer = live.chat([{"role": "user", "content": f"Support question {i}?"}], n=2,
                           model="support")  # fmt: skip
        assert live.feedback(completion_id=answer["id"], type="pick", chosen_index=0,
                             user=f"u{i}").status_code == 201  # fmt: skip
    models = [m["id"] for m in live.http.get("/v1/models").json()["data"]]
    assert models == ["tiny", "support"]  # a configured segment, served by the base for now

    run = wait_run(live, live.http.post("/v1/operator/runs", headers=OPS).json()["id"])
    assert run["status"] == "skipped" and "in segment 'default'" in run["error"]
    run = wait_run(
        live,
        live.http.post("/v1/operator/runs", json={"segment": "support"}, headers=OPS).json()["id"],
    )
    assert (run["status"], run["outcome"]) == ("succeeded", "promoted"), run["error"]
    assert run["counts"]["approved"] == 8 and run["candidate_version"] == "support@v1"
    [kl] = [c for c in run["verdict"]["checks"] if c["name"] == "kl"]
    assert kl["passed"] and "maximum 1000000000.000" in kl["detail"], kl
    # The default segment still serves the base model; `support` serves its new version.
    assert live.chat([{"role": "user", "content": "hi"}])["adapter_version"] is None
    deadline = time.monotonic() + 5
    while (
        live.chat([{"role": "user", "content": "hi"}], model="support")["adapter_version"] is None
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize(
    "settings_overrides",
    [{"refresh_enabled": True, "refresh_cron": "30 2 * * *", "refresh_timezone": "Europe/Paris"}],
    indirect=False,
)
def test_serve_runs_the_scheduler(live: Live) -> None:
    schedule = live.http.get("/v1/operator/schedule", headers=OPS).json()
    assert schedule["enabled"] is True and schedule["running"] is None
    assert set(schedule["jobs"]) == {"scheduled-refresh", "threshold-refresh"}
    assert "T02:30:00+01:00" in schedule["jobs"]["scheduled-refresh"]  # Paris in winter
