"""What operators can do to the server, with API keys on, through real HTTP on a tiny model:
adapters come from an upload (safetensors only, checked before anything is stored) or from an
admin-configured import root, never from any server directory; each bad upload or path is a
clear 4xx and stores nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_adapter
from tests.service.conftest import Live
from tests.service.test_auth import Keys, error
from tests.service.test_observability import scrape, value

UPLOAD = "/v1/operator/adapters/upload"


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("upload") / "a", seed=5)


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "imports"
    root.mkdir()
    return root


@pytest.fixture
def settings_overrides(tmp_path: Path) -> dict[str, Any]:
    return {
        "auth": "keys",
        "auth_cache_seconds": 0.0,
        "segments": ["default", "acme"],
        "segment_tenants": {"acme": "acme"},
        "adapter_import_roots": [tmp_path / "imports"],
        "rate_limit_requests_per_minute": 10_000,
        "max_upload_bytes": 50_000_000,
        "metrics_cache_seconds": 3600.0,  # one database read per test
    }


@pytest.fixture
def keys(live: Live) -> Keys:
    return Keys(live)


def upload(
    live: Live, key: dict[str, str], config: bytes, weights: bytes, **form: str
) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", config, "application/json"),
        "weights": ("adapter_model.safetensors", weights, "application/octet-stream"),
    }
    return live.http.post(UPLOAD, files=files, data=form, headers=key)


def versions(live: Live, key: dict[str, str]) -> list[str]:
    return [v["id"] for v in live.http.get("/v1/operator/adapters", headers=key).json()["data"]]


def test_an_uploaded_adapter_becomes_a_candidate_and_junk_is_refused(
    live: Live, keys: Keys, adapter: Path
) -> None:
    ops, acme_ops = keys.make("operator"), keys.make("operator", "acme")
    config = (adapter / "adapter_config.json").read_bytes()
    weights = (adapter / "adapter_model.safetensors").read_bytes()

    r = upload(live, ops, config, weights, reason="from the lab")
    assert r.status_code == 201, r.text
    row = r.json()
    assert (row["id"], row["status"], row["status_reason"]) == (
        "default@v1", "candidate", "from the lab"
    )  # fmt: skip
    stored = Path(live.http.get(f"/v1/operator/adapters/{row['id']}", headers=ops).json()["path"])
    assert (stored / "adapter_model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in stored.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"
    ]  # fmt: skip
    # The same weights again: the same version, nothing new.
    assert upload(live, ops, config, weights).json()["id"] == "default@v1"

    bad = [
        (config, b"not a tensor file", "not a safetensors file"),
        (config, weights[: len(weights) // 2], "truncated"),
        (b"{not json", weights, "not valid JSON"),
        (b'{"peft_type": "PROMPT_TUNING"}', weights, "LoRA adapter"),
    ]
    for cfg, w, message in bad:
        r = upload(live, ops, cfg, w)
        assert r.status_code == 400 and message in error(r)["message"], r.text
    r = live.http.post(UPLOAD, files={"config": ("c.json", config)}, headers=ops)
    assert r.status_code == 400 and error(r)["param"] == "weights", r.text
    r = upload(live, ops, config, weights, segment="Not A Segment")
    assert r.status_code == 400, r.text
    # Another tenant's segment does not exist for this operator; users may not upload.
    assert upload(live, acme_ops, config, weights).status_code == 404
    assert upload(live, keys.make("user"), config, weights).status_code == 403
    assert versions(live, ops) == ["default@v1"]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"auth": "keys", "auth_cache_seconds": 0.0, "max_upload_bytes": 4096}],
)
def test_uploads_over_the_limit_and_paths_without_roots_are_refused(
    live: Live, keys: Keys, adapter: Path
) -> None:
    ops = keys.make("operator")
    config = (adapter / "adapter_config.json").read_bytes()
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    r = upload(live, ops, config, weights)
    assert r.status_code == 413 and "PREFLOOP_MAX_UPLOAD_BYTES" in error(r)["message"]
    # No import roots configured: no server directory at all, even a real adapter.
    r = live.http.post("/v1/operator/adapters", json={"path": str(adapter)}, headers=ops)
    assert r.status_code == 403 and "PREFLOOP_ADAPTER_IMPORT_ROOTS" in error(r)["message"]
    assert versions(live, ops) == []


def test_paths_register_only_from_the_import_roots(
    live: Live, keys: Keys, adapter: Path, roots: Path, tmp_path: Path
) -> None:
    ops = keys.make("operator")

    def register(path: Path | str) -> httpx.Response:
        return live.http.post("/v1/operator/adapters", json={"path": str(path)}, headers=ops)

    # Outside the roots: an adapter elsewhere, a path that climbs out, the adapter store.
    assert register(adapter).status_code == 403
    assert register(f"{roots}/../../{adapter.parent.name}").status_code == 403
    inside = roots / "ok"
    inside.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (inside / name).write_bytes((adapter / name).read_bytes())
    (inside / "adapter_model.bin").write_bytes(b"a pickle would run code when loaded")
    r = register(inside)
    assert r.status_code == 201, r.text
    stored = Path(r.json()["path"])
    assert not (stored / "adapter_model.bin").exists()  # only the known files are copied
    r = register(stored)
    assert r.status_code == 403 and "inside the adapter store" in error(r)["message"]

    pickled = roots / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"a pickle")
    r = register(pickled)
    assert r.status_code == 400 and "pickled adapter_model.bin is refused" in error(r)["message"]
    link = roots / "link"
    link.symlink_to(adapter)  # a symlink out of the root is judged by where it leads
    assert register(link).status_code == 403
    for junk in (roots / "missing", "\x00", "~" * 4000):
        assert register(junk).status_code in (400, 403), junk
    assert versions(live, ops) == ["default@v1"]


def test_metrics_need_an_admin_key_and_the_database_is_read_once_per_interval(
    live: Live, keys: Keys
) -> None:
    """With keys on, `/metrics` (every tenant's traffic) is an admin's; its database gauges
    are cached (PREFLOOP_METRICS_CACHE_SECONDS) while counters move."""
    assert live.http.get("/metrics").status_code == 401
    assert live.http.get("/metrics", headers=keys.make("operator")).status_code == 403
    admin = keys.make("admin")
    first = scrape(live.http, admin)
    user = keys.make("user")
    answer = keys.chat(user).json()
    r = live.http.post(
        "/v1/feedback", json={"completion_id": answer["id"], "rating": 1}, headers=user
    )
    assert r.status_code == 201, r.text
    second = scrape(live.http, admin)
    assert value(second, "prefloop_feedback_events_total", kind="thumbs") == 1 + value(
        first, "prefloop_feedback_events_total", kind="thumbs"
    )  # counted as it happened
    assert value(second, "prefloop_thumbs_total", adapter_version="base", vote="up") == value(
        first, "prefloop_thumbs_total", adapter_version="base", vote="up"
    )  # read from the database at the first scrape, not again yet


@pytest.mark.parametrize(
    "settings_overrides", [{"auth": "keys", "auth_cache_seconds": 0.0, "metrics_token": "s3cret"}]
)
def test_metrics_take_their_own_token(live: Live, keys: Keys) -> None:
    assert live.http.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert live.http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert live.http.get("/metrics", headers=keys.make("admin")).status_code == 401


def test_compile_counts_and_golden_sets_are_scoped_to_the_operators_tenant(
    live: Live, keys: Keys
) -> None:
    d_user, a_user = keys.make("user", "default"), keys.make("user", "acme")
    d_ops, a_ops, admin = keys.make("operator"), keys.make("operator", "acme"), keys.make("admin")
    for user, model in ((d_user, "default"), (d_user, "default"), (a_user, "acme")):
        answer = keys.chat(user, model=model, n=2, temperature=1.0, seed=len(model)).json()
        pick = {"completion_id": answer["id"], "type": "pick", "chosen_index": 0}
        assert live.http.post("/v1/feedback", json=pick, headers=user).status_code == 201

    def compile_(key: dict[str, str]) -> dict[str, Any]:
        r = live.http.post("/v1/operator/pairs/compile", headers=key)
        assert r.status_code == 200, r.text
        return r.json()

    acme = compile_(a_ops)  # acme's one pick, nothing of default's two
    assert (acme["pairs"], acme["stored"], acme["feedback"]) == (1, {"approved": 1}, 1)
    assert compile_(d_ops)["pairs"] == 2
    assert compile_(admin)["pairs"] == 0  # everything is compiled already

    item = {"prompt": "Say hi.", "checks": {"contains": ["hi"]}}
    assert live.http.put("/v1/operator/golden/hi", json=item, headers=a_ops).status_code == 403
    r = live.http.put("/v1/operator/golden/hi?segment=acme", json=item, headers=a_ops)
    assert r.status_code == 200, r.text
    r = live.http.put("/v1/operator/golden/hi?segment=default", json=item, headers=a_ops)
    assert r.status_code == 404
    listed = live.http.get("/v1/operator/golden?segment=acme", headers=a_ops).json()
    assert [i["id"] for i in listed["data"]] == ["hi"] and listed["path"].endswith("acme.jsonl")
    assert live.http.get("/v1/operator/golden", headers=a_ops).json()["data"] == []
    assert live.http.put("/v1/operator/golden/hi", json=item, headers=admin).status_code == 200
    r = live.http.delete("/v1/operator/golden/hi?segment=acme", headers=a_ops)
    assert r.status_code == 200 and r.json() == {"id": "hi", "deleted": True}
