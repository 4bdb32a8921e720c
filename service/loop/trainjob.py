"""A refresh's training as a Kubernetes indexed Job (PREFLOOP_REFRESH_LAUNCHER=kubernetes), or
that same Job's pods run here as processes (`local-job`).

`render_job` fills the base manifest (deploy/k8s/train-job.yaml, or the operator's copy) for
one run: a headless Service and an indexed Job of N pods (one per node), pod i running

    python -m torch.distributed.run --nnodes=N --nproc-per-node=G
        --node-rank=$(JOB_COMPLETION_INDEX) --rdzv-backend=static
        --rdzv-endpoint=<job>-0.<job>:29500 -m trainer train <args>

so pod 0, reached through the Service by its stable DNS name, hosts torchrun's rendezvous. The
run's inputs (pairs, base model, parent adapter) and outputs (the adapter directory with its
metrics.jsonl) are paths on shared volumes, mounted in the pods at the same paths as here, so the
refresh reads the progress and registers the adapter as if it had trained locally.

`KubernetesJob` submits the manifest with `kubectl apply`, polls the Job's status, reports pods
that cannot start (a missing image, a bad secret) as failures, and deletes the Job and its
Service when it ends or is cancelled, after copying the pods' log tail into the run's log.
`LocalJob` runs each pod's command as a local process group with JOB_COMPLETION_INDEX set and the
rendezvous on 127.0.0.1, the shared volumes being this machine's directories.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from service.core.config import Settings
from service.loop.launch import (
    Launch,
    Process,
    Watcher,
    _signal_group,
    cause,
    describe,
    run_subprocess,
    trainer_launcher,
    wait_for,
)

TEMPLATE = Path("deploy") / "k8s" / "train-job.yaml"
LABEL = "prefloop.io/train-job"  # on the pods: the Service selects them, kubectl finds them
PORT = 29500  # torchrun's rendezvous on pod 0
PATH_FLAGS = ("--pairs", "--base", "--out", "--init-adapter", "--rehearsal-prompts")


# --- rendering --------------------------------------------------------------------------------


def template_path(settings: Settings) -> Path:
    """PREFLOOP_REFRESH_JOB_TEMPLATE, else the shipped base: in the working directory (the
    image's /app) or in the source checkout."""
    if settings.refresh_job_template:
        return Path(settings.refresh_job_template).expanduser()
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / TEMPLATE).is_file():
            return root / TEMPLATE
    raise FileNotFoundError(f"no {TEMPLATE} here; set PREFLOOP_REFRESH_JOB_TEMPLATE")


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise ValueError(f"the training Job's template needs one {kind}, has {len(found)}")
    return found[0]


def render_job(settings: Settings, name: str, args: list[str]) -> list[dict[str, Any]]:
    """The Service and the indexed Job that run `trainer ARGS` for the run `name` (a DNS
    label: the Job's and the Service's name)."""
    docs = [d for d in yaml.safe_load_all(template_path(settings).read_text()) if d]
    service, job = _one(docs, "Service"), _one(docs, "Job")
    for doc in (service, job):
        doc["metadata"].update(name=name, namespace=settings.refresh_job_namespace)
    service["spec"]["selector"] = {LABEL: name}
    nodes = settings.refresh_job_nodes
    job["spec"].update(
        completionMode="Indexed",
        completions=nodes,
        parallelism=nodes,
        activeDeadlineSeconds=int(settings.refresh_train_timeout_minutes * 60),
    )
    pod = job["spec"]["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {})[LABEL] = name
    pod["spec"]["subdomain"] = name
    if settings.refresh_job_service_account:
        pod["spec"]["serviceAccountName"] = settings.refresh_job_service_account
    container = pod["spec"]["containers"][0]
    container["image"] = settings.refresh_job_image
    gpus = settings.refresh_job_gpus_per_node
    container["command"] = [
        "python", "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--nproc-per-node={max(gpus, 1)}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",  # Kubernetes puts the index in the pod's env
        "--rdzv-backend=static", f"--rdzv-endpoint={name}-0.{name}:{PORT}",
        "-m", "trainer", *_shared(args, settings.refresh_job_volumes),
    ]  # fmt: skip
    container.pop("args", None)
    limits = container.setdefault("resources", {}).setdefault("limits", {})
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    else:
        limits.pop("nvidia.com/gpu", None)
    _mount(pod["spec"], container, settings.refresh_job_volumes)
    return [service, job]


def _shared(args: list[str], volumes: dict[str, str]) -> list[str]:
    """The trainer's arguments with its local paths made absolute and checked to lie on a
    shared volume (where any are configured); `$(` escaped from Kubernetes' expansion."""
    out = list(args)
    for i in range(1, len(out)):
        path = Path(out[i])
        if out[i - 1] not in PATH_FLAGS or not (path.is_absolute() or path.exists()):
            continue  # not a path, or a hub model id the pods download
        path = path.absolute()
        if volumes and not any(path.is_relative_to(m) for m in volumes.values()):
            raise ValueError(
                f"{out[i - 1]} {path} is on none of the shared volumes the training Job mounts "
                f"(PREFLOOP_REFRESH_JOB_VOLUMES: {json.dumps(volumes)}), so its pods could not "
                "see it: put PREFLOOP_HOME, the adapter store and the model on them"
            )
        out[i] = str(path)
    return [a.replace("$(", "$$(") for a in out]


def _mount(spec: dict[str, Any], container: dict[str, Any], volumes: dict[str, str]) -> None:
    """The template's claims replaced by PREFLOOP_REFRESH_JOB_VOLUMES (its other volumes, such
    as the shared memory, kept), each at the same path as in this process."""
    dropped = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] not in dropped]
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] not in dropped]
    for i, (claim, path) in enumerate(volumes.items()):
        claimed = {"name": f"shared-{i}", "persistentVolumeClaim": {"claimName": claim}}
        spec["volumes"].append(claimed)
        mounts.append({"name": f"shared-{i}", "mountPath": path})
    container["volumeMounts"] = mounts


def _pod_command(job: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    return [*container["command"], *container.get("args", [])], env


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of a container's command: `$$` is a literal `$`, an
    unknown variable stays as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
        arg,
    )


# --- the Job's pods as local processes --------------------------------------------------------


class LocalJob:
    """The rendered Job run here: one process group per completion index, with the pod's env
    and JOB_COMPLETION_INDEX, `python` this interpreter, the rendezvous on 127.0.0.1. Like a
    Job with backoffLimit 0, it fails when any pod fails, and the other pods are stopped."""

    def __init__(self, manifest: list[dict[str, Any]], log_lines: deque[str]) -> None:
        job = _one(manifest, "Job")
        self.name = job["metadata"]["name"]
        command, env = _pod_command(job)
        endpoint = f"127.0.0.1:{_free_port()}"
        self.pods: list[Process] = []
        self.failed: list[str] = []
        for index in range(job["spec"]["completions"]):
            pod_env = {**env, "JOB_COMPLETION_INDEX": str(index)}
            cmd = [_expand(a, pod_env) for a in command]
            cmd = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(cmd)]
            cmd = [f"--rdzv-endpoint={endpoint}" if a.startswith("--rdzv-endpoint=") else a
                   for a in cmd]  # fmt: skip
            self.pods.append(Process(cmd, log_lines, env=pod_env, prefix=f"[pod {index}] "))

    def poll(self) -> bool:
        if not self.failed and any(p.poll() and p.error() for p in self.pods):
            failed = [i for i, p in enumerate(self.pods) if p.poll() and p.error()]
            self.close()  # the others stopped; every pod's output read to its end
            self.failed = [
                f"pod {self.name}-{i} {self.pods[i].error()}" + _because(self.pods[i].lines)
                for i in failed
            ]
        return bool(self.failed) or all(p.poll() for p in self.pods)

    def error(self) -> str | None:
        return "failed: " + "; ".join(self.failed) if self.failed else None

    def stop(self) -> None:
        self.close()

    def close(self) -> None:
        for p in self.pods:  # all told first, so they stop together
            if not p.poll():
                _signal_group(p.proc, signal.SIGTERM)
        for p in self.pods:
            p.close()


def _because(lines: list[str] | deque[str]) -> str:
    why = cause(lines)
    return f" ({why})" if why else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the Job on a cluster ---------------------------------------------------------------------

# Pods waiting for one of these will not start without someone changing something.
STUCK = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "CrashLoopBackOff",
}  # fmt: skip


class KubernetesJob:
    """The Job on the cluster kubectl reaches (its current context; in a pod, the pod's service
    account, which needs to create, get and delete Jobs and Services and read pods and logs)."""

    POLL_SECONDS = 2.0
    ERRORS_TOLERATED = 5  # consecutive failed status reads (an API server restarting)

    def __init__(self, manifest: list[dict[str, Any]], log_lines: deque[str]) -> None:
        job = _one(manifest, "Job")
        self.name, self.ns = job["metadata"]["name"], job["metadata"]["namespace"]
        self.pods = job["spec"]["completions"]
        self.log_lines = log_lines
        self._next, self._errors, self._closed = 0.0, 0, False
        self._done, self._error, self._pod_states = False, None, ""
        self._logs: list[str] = []
        command, _ = _pod_command(job)
        log_lines.append(f"$ kubectl apply -f -  # Job {self.ns}/{self.name}, {self.pods} pods")
        log_lines.append("$ " + " ".join(command))
        listing = {"apiVersion": "v1", "kind": "List", "items": manifest}
        out = self._kubectl("apply", "-f", "-", input=json.dumps(listing))
        if out.returncode != 0:
            self.close()  # the Service may exist without the Job
            raise RuntimeError(f"kubectl apply failed: {out.stderr.strip()[-1000:]}")

    def _kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        cmd = ["kubectl", *args]
        try:
            return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:  # an unreachable API server: a failed call
            return subprocess.CompletedProcess(cmd, 1, "", "kubectl: no answer in 60 s")

    def _get(self, *what: str) -> dict[str, Any] | None:
        out = self._kubectl("get", *what, "-n", self.ns, "-o", "json")
        if out.returncode != 0:
            self._errors += 1
            self.log_lines.append(f"kubectl get {' '.join(what)}: {out.stderr.strip()[-300:]}")
            if self._errors >= self.ERRORS_TOLERATED:
                self._done, self._error = True, f"could not be read: {out.stderr.strip()[-300:]}"
            return None
        self._errors = 0
        return json.loads(out.stdout)

    def poll(self) -> bool:
        if self._done or time.monotonic() < self._next:
            return self._done
        self._next = time.monotonic() + self.POLL_SECONDS
        job = self._get("job", self.name)
        if job is None:
            return self._done
        true = {c["type"]: c for c in job["status"].get("conditions", []) if c["status"] == "True"}
        if "Failed" in true:
            c = true["Failed"]
            self._done, self._error = True, f"failed ({c.get('reason')}: {c.get('message')})"
        elif "Complete" in true:
            self._done = True
        else:
            self._watch_pods()
        return self._done

    def _watch_pods(self) -> None:
        """Log the pods' states when they change; a pod that cannot start fails the Job."""
        pods = self._get("pods", "-l", f"{LABEL}={self.name}")
        if pods is None:
            return
        states, stuck = [], []
        for pod in pods["items"]:
            name, status = pod["metadata"]["name"], pod.get("status", {})
            waiting = [
                s["state"]["waiting"]
                for s in status.get("containerStatuses", [])
                if "waiting" in s.get("state", {})
            ]
            reason = waiting[0].get("reason", "") if waiting else ""
            states.append(f"{name} {status.get('phase', '?')}{' ' + reason if reason else ''}")
            if reason in STUCK:
                stuck.append(f"{name}: {reason}: {waiting[0].get('message', '')}")
        if (line := "; ".join(sorted(states))) != self._pod_states:
            self._pod_states = line
            self.log_lines.append(f"pods: {line}")
        if stuck:
            self._done, self._error = True, "cannot start: " + "; ".join(stuck)

    def error(self) -> str | None:
        if self._error is None:
            return None
        return self._error + _because(self._logs)

    def stop(self) -> None:
        self.close()

    def close(self) -> None:
        """The pods' log tail into the run's log, then the Job (its pods) and Service deleted."""
        if self._closed:
            return
        self._closed = True
        logs = self._kubectl(
            "logs", "-n", self.ns, "-l", f"{LABEL}={self.name}", "--prefix", "--tail=100",
            f"--max-log-requests={max(self.pods, 1)}",
        )  # fmt: skip
        self._kubectl(
            "delete", "-n", self.ns, f"job/{self.name}", f"service/{self.name}",
            "--ignore-not-found", "--wait=false",
        )  # fmt: skip
        self.log_lines.append(f"$ kubectl delete job/{self.name} service/{self.name}")
        self._logs = [line[:500] for line in logs.stdout.splitlines()]
        self.log_lines.extend(self._logs)


def run_training(
    settings: Settings,
    rec: Watcher,
    args: list[str],
    *,
    name: str,
    log_lines: deque[str],
    progress_files: list[Path],
) -> None:
    """`trainer train ARGS` where PREFLOOP_REFRESH_LAUNCHER says: a subprocess here, or the
    Job `name` rendered from the template, run here (`local-job`) or on the cluster."""
    timeout = settings.refresh_train_timeout_minutes * 60
    if settings.refresh_launcher == "local":
        cmd = [*trainer_launcher(settings.refresh_train_nproc), *args]
        run_subprocess(
            cmd, rec, log_lines=log_lines, progress_files=progress_files, timeout=timeout
        )
        return
    manifest = render_job(settings, name, args)
    if settings.refresh_launcher == "kubernetes":
        launch: Launch = KubernetesJob(manifest, log_lines)
    else:
        launch = LocalJob(manifest, log_lines)
    wait_for(
        launch,
        rec,
        what=describe(["trainer", *args]),
        log_lines=log_lines,
        progress_files=progress_files,
        timeout=timeout,
    )
