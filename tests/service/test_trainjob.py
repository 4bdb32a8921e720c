"""A refresh's training as a Kubernetes indexed Job: the rendered manifest, the Job's pods run
here as processes (`local-job`: a real training through the manifest, its progress, failure and
cancel), and the protocol with the cluster (`kubernetes`: apply, poll, logs, delete)."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from service.core.config import Settings
from service.loop.runs import Recorder, RefreshCancelled, create_run, request_cancel
from service.loop.trainjob import KubernetesJob, render_job, run_training
from service.storage.db import init_db, make_engine
from service.storage.tables import TrainingRun
from tests.service.conftest import Live
from tests.service.test_refresh import FAST, OPS, picks, wait_run

NAME = "prefloop-run-0123abcd"


def _job_settings(tmp_path: Path, **over: Any) -> Settings:
    return Settings(
        home=tmp_path,
        refresh_job_volumes={"prefloop-home": str(tmp_path)},
        refresh_job_nodes=2,
        **over,
    )


def _args(tmp_path: Path) -> list[str]:
    work = tmp_path / "runs" / "run-1"
    return ["train", "--pairs", str(work / "train.jsonl"), "--base", "HuggingFaceTB/SmolLM2",
            "--out", str(work / "adapter"), "--lr", "0.0002"]  # fmt: skip


def test_the_job_runs_torchrun_on_every_node_with_the_runs_files_on_shared_volumes(
    tmp_path: Path,
) -> None:
    settings = _job_settings(tmp_path, refresh_job_gpus_per_node=4, refresh_job_image="reg/p:1")
    service, job = render_job(settings, NAME, _args(tmp_path))
    assert (service["kind"], service["spec"]["clusterIP"]) == ("Service", "None")
    assert service["spec"]["selector"] == {"prefloop.io/train-job": NAME}
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["activeDeadlineSeconds"] == settings.refresh_train_timeout_minutes * 60
    pod = spec["template"]
    assert pod["metadata"]["labels"]["prefloop.io/train-job"] == NAME
    assert pod["spec"]["subdomain"] == NAME  # pod 0 is NAME-0.NAME
    [container] = pod["spec"]["containers"]
    assert container["image"] == "reg/p:1"
    assert container["command"][:9] == [
        "python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
        "--node-rank=$(JOB_COMPLETION_INDEX)", "--rdzv-backend=static",
        f"--rdzv-endpoint={NAME}-0.{NAME}:29500", "-m",
    ]  # fmt: skip
    assert container["command"][9:] == ["trainer", *_args(tmp_path)]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert {claims[n]: mounts[n] for n in claims} == {"prefloop-home": str(tmp_path)}
    assert mounts["shm"] == "/dev/shm", "the template's own volumes stay"

    cpu = render_job(_job_settings(tmp_path, refresh_job_gpus_per_node=0), NAME, ["train"])[1]
    cpu_container = cpu["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert "--nproc-per-node=1" in cpu_container["command"]


def test_a_path_off_the_shared_volumes_is_refused(tmp_path: Path) -> None:
    settings = _job_settings(tmp_path / "shared")
    with pytest.raises(ValueError, match=r"--pairs .*train.jsonl is on none of the shared"):
        render_job(settings, NAME, _args(tmp_path))
    with pytest.raises(ValueError, match="refresh_job_volumes"):
        Settings(refresh_launcher="kubernetes")


# --- local-job: the rendered Job's pods as local processes, a real training ------------------

LOCAL_JOB = {**FAST, "refresh_launcher": "local-job", "refresh_job_nodes": 2,
             "refresh_job_gpus_per_node": 0}  # fmt: skip


@pytest.mark.slow  # trains
@pytest.mark.parametrize("settings_overrides", [LOCAL_JOB])
def test_a_refresh_trains_through_the_rendered_job_on_two_local_nodes(live: Live) -> None:
    picks(live, 12)
    r = live.http.post("/v1/operator/runs", json={"segment": "default"}, headers=OPS)
    run = wait_run(live, r.json()["id"])
    assert (run["status"], run["outcome"]) == ("succeeded", "promoted"), (
        run["error"], run["log"][-3000:],
    )  # fmt: skip
    train = run["steps"][2]
    assert train["name"] == "train" and train["detail"]["processes"] == 2  # one per "node"
    assert run["progress"]["step"] == run["progress"]["total"] > 0
    log = run["log"]
    for index in (0, 1):  # each pod's command, expanded as Kubernetes would
        assert f"[pod {index}] $ " in log
        assert f"--nnodes=2 --nproc-per-node=1 --node-rank={index} --rdzv-backend=static" in log
    assert "--rdzv-endpoint=127.0.0.1:" in log and "-m trainer train --pairs" in log


@pytest.mark.slow  # starts torchrun
@pytest.mark.parametrize("settings_overrides", [{**LOCAL_JOB, "refresh_train": {"lr": -1.0}}])
def test_a_failing_job_fails_the_train_step_with_the_pods_error(live: Live) -> None:
    picks(live, 8)
    run = wait_run(live, live.http.post("/v1/operator/runs", headers=OPS).json()["id"])
    assert (run["status"], run["stage"]) == ("failed", "train"), run["error"]
    assert run["error"].startswith(f"RuntimeError: trainer train failed: pod prefloop-{run['id']}-")
    assert "exited with 1 (error: Invalid learning rate: -1.0)" in run["error"]
    assert run["candidate_version"] is None


@pytest.mark.slow  # trains
@pytest.mark.parametrize(
    "settings_overrides",
    [{**LOCAL_JOB, "refresh_train": {**FAST["refresh_train"], "epochs": 100_000}}],
)
def test_cancel_stops_the_jobs_pods(live: Live) -> None:
    picks(live, 8)
    run_id = live.http.post("/v1/operator/runs", headers=OPS).json()["id"]
    deadline = time.monotonic() + 180
    while (
        live.http.get(f"/v1/operator/runs/{run_id}", headers=OPS).json()["progress"].get("step", 0)
        < 1
    ):  # training on both pods
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert live.http.post(f"/v1/operator/runs/{run_id}/cancel", headers=OPS).status_code == 200
    run = wait_run(live, run_id, timeout=120)  # 100000 epochs: ending means the pods stopped
    assert (run["status"], run["stage"]) == ("cancelled", "train")
    assert run["progress"]["step"] < run["progress"]["total"]


# --- kubernetes: the protocol with the cluster, against a stand-in kubectl --------------------

# No cluster runs here, so this shell script stands in for kubectl, only to test the protocol:
# what is applied, which status is read, and that logs are copied and the Job deleted. It logs
# its calls and answers from files the test writes (job.json, pods.json, logs).
FAKE_KUBECTL = """#!/usr/bin/env bash
d="$FAKE_KUBE"
echo "$*" >> "$d/calls"
case "$1" in
  apply) cat > "$d/applied.json" ;;
  get) if [ "$2" = job ]; then cat "$d/job.json"; else cat "$d/pods.json"; fi ;;
  logs) cat "$d/logs" ;;
  delete) : ;;
esac
"""


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "kube"
    (d / "bin").mkdir(parents=True)
    kubectl = d / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{d / 'bin'}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_KUBE", str(d))
    monkeypatch.setattr(KubernetesJob, "POLL_SECONDS", 0.05)
    _status(d, {"active": 2})
    (d / "pods.json").write_text(json.dumps({"items": []}))
    (d / "logs").write_text("")
    return d


def _status(d: Path, status: dict[str, Any]) -> None:
    (d / "job.json").write_text(json.dumps({"status": status}))


def _done(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    condition = {"type": kind, "status": "True", "reason": reason, "message": message}
    return {"conditions": [{"type": "Suspended", "status": "False"}, condition]}


class Run:
    """A real run row and its Recorder, and `run_training` under the kubernetes launcher."""

    def __init__(self, tmp_path: Path) -> None:
        self.settings = _job_settings(tmp_path, refresh_launcher="kubernetes")
        self.db = make_engine(self.settings)
        init_db(self.db)
        self.run = create_run(self.db, segment="default", trigger="manual", actor="t")
        self.rec = Recorder(self.db, self.run.id)
        self.log: deque[str] = deque(maxlen=200)
        self.work = tmp_path / "runs" / "run-1"
        self.metrics = self.work / ".adapter.partial" / "metrics.jsonl"

    def train(self) -> None:
        run_training(
            self.settings, self.rec, _args(self.work.parent.parent), name=NAME,
            log_lines=self.log, progress_files=[self.metrics],
        )  # fmt: skip

    def row(self) -> TrainingRun:
        with Session(self.db) as s:
            return s.get(TrainingRun, self.run.id)


def _calls(kube: Path) -> list[str]:
    return (kube / "calls").read_text().splitlines()


def test_kubernetes_applies_the_job_streams_progress_and_deletes_it(
    kube: Path, tmp_path: Path
) -> None:
    run = Run(tmp_path)
    run.metrics.parent.mkdir(parents=True)
    row = {"split": "train", "step": 1, "total": 4, "loss": 0.69, "margin": 0.0}
    run.metrics.write_text(json.dumps(row) + "\n")

    def finish_once_progress_is_seen() -> None:
        deadline = time.monotonic() + 30
        while not run.row().progress and time.monotonic() < deadline:
            time.sleep(0.05)
        (kube / "logs").write_text("[pod/x-0/trainer] step 4/4\n")
        _status(kube, _done("Complete"))

    threading.Thread(target=finish_once_progress_is_seen, daemon=True).start()
    run.train()
    assert run.row().progress["step"] == 1 and run.row().progress["total"] == 4
    applied = json.loads((kube / "applied.json").read_text())
    assert [d["kind"] for d in applied["items"]] == ["Service", "Job"]
    assert applied["items"][1]["metadata"] == {
        "name": NAME, "namespace": "prefloop", "labels": applied["items"][1]["metadata"]["labels"],
    }  # fmt: skip
    calls = _calls(kube)
    assert calls[0] == "apply -f -"
    assert f"get job {NAME} -n prefloop -o json" in calls
    assert f"get pods -l prefloop.io/train-job={NAME} -n prefloop -o json" in calls
    assert calls[-2].startswith(f"logs -n prefloop -l prefloop.io/train-job={NAME} --prefix")
    assert (
        calls[-1] == f"delete -n prefloop job/{NAME} service/{NAME} --ignore-not-found --wait=false"
    )
    assert "[pod/x-0/trainer] step 4/4" in run.log


def test_kubernetes_job_failure_fails_with_the_pods_log_tail(kube: Path, tmp_path: Path) -> None:
    (kube / "logs").write_text(
        "[pod/x-1/trainer] Traceback (most recent call last):\n"
        "[pod/x-1/trainer] error: Invalid learning rate: -1.0\n"
        "[pod/x-0/trainer] torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    )
    _status(kube, _done("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit"))
    run = Run(tmp_path)
    with pytest.raises(RuntimeError) as err:
        run.train()
    assert str(err.value).startswith(
        "trainer train failed (BackoffLimitExceeded: Job has reached the backoff limit) "
        "(error: Invalid learning rate: -1.0): "
    )
    assert "ChildFailedError" in str(err.value)  # the log tail follows
    assert _calls(kube)[-1].startswith(f"delete -n prefloop job/{NAME} service/{NAME}")


def test_a_pod_that_cannot_start_fails_the_job(kube: Path, tmp_path: Path) -> None:
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": 'pull "reg/p:1": not found'}}
    pod = {"metadata": {"name": f"{NAME}-0-abc"},
           "status": {"phase": "Pending", "containerStatuses": [{"state": waiting}]}}  # fmt: skip
    (kube / "pods.json").write_text(json.dumps({"items": [pod]}))
    run = Run(tmp_path)
    with pytest.raises(RuntimeError, match=r"cannot start: .*-0-abc: ImagePullBackOff: pull"):
        run.train()
    assert f"pods: {NAME}-0-abc Pending ImagePullBackOff" in run.log
    assert _calls(kube)[-1].startswith("delete ")


def test_cancel_deletes_the_job(kube: Path, tmp_path: Path) -> None:
    run = Run(tmp_path)
    threading.Timer(0.5, request_cancel, (run.db, run.run.id)).start()
    with pytest.raises(RefreshCancelled):
        run.train()
    calls = _calls(kube)
    assert calls.count(f"delete -n prefloop job/{NAME} service/{NAME} --ignore-not-found "
                       "--wait=false") == 1  # fmt: skip
    assert calls[-1].startswith("delete ")


def test_a_refused_apply_fails_at_once(kube: Path, tmp_path: Path) -> None:
    script = kube / "bin" / "kubectl"
    script.write_text(
        FAKE_KUBECTL.replace(
            'apply) cat > "$d/applied.json" ;;',
            'apply) echo "forbidden: jobs.batch" >&2; exit 1 ;;',
        )
    )
    with pytest.raises(RuntimeError, match="kubectl apply failed: forbidden: jobs.batch"):
        Run(tmp_path).train()
    assert _calls(kube)[-1].startswith("delete ")  # the Service may have been created
