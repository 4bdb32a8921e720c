"""Fuzzing: schemathesis generates requests, valid and invalid, from the service's own OpenAPI
schema and sends them to the live app (uvicorn, tiny random Llama, SQLite). No response may be
a 5xx, and every response must match the schema (documented status code, content type,
headers, body); invalid input must be refused, and a bad key too. Objects of every kind are
made first (answers, votes, pairs, uploaded adapters, golden items, a run), and generated
requests name them half the time, so every operation is reached past its lookups: each must
answer at least one request with a success (or a 409 about the state it found).

Not checked: that every schema-valid request succeeds ("positive data acceptance"). Some rules
are beyond JSON Schema and answer 400 by design: the last message must be the user's, the
prompt must fit the model's context, a registered path must be an adapter directory on the
server, a golden check's regex must compile."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import create_engine

from service.auth import create_key
from service.loop.runs import create_run
from tests.conftest import make_adapter
from tests.service.conftest import Live

# Hundreds of generated requests through real HTTP.
pytestmark = pytest.mark.slow

# Per operation. CI runs this; `make bench-fuzz` runs 20 times as many (PREFLOOP_FUZZ_SCALE).
SCALE = int(os.environ.get("PREFLOOP_FUZZ_SCALE", "1"))
EXAMPLES = {GenerationMode.POSITIVE: 25 * SCALE, GenerationMode.NEGATIVE: 15 * SCALE}


@pytest.fixture
def settings_overrides(tmp_path: Path) -> dict[str, Any]:
    # Keys on, as in production (an admin key reaches every route; the invalid-auth check sends
    # bad keys). Small answers keep generation fast; the limits themselves are fuzzed too.
    return {
        "auth": "keys",
        "rate_limit_requests_per_minute": 0,
        "rate_limit_tokens_per_minute": 0,
        "max_tokens_limit": 8,
        "default_max_tokens": 4,
        "max_n": 2,
        "max_messages": 16,
        "adapter_import_roots": [tmp_path / "imports"],
    }


# Where a generated request names an object, half the time it names a real one: the ids below,
# seeded before fuzzing, so every operation's own logic runs, not just its 404.
ID_FIELDS = {
    "completion_id": "completions", "regenerate": "completions", "version_id": "versions",
    "to": "versions", "pair_id": "pairs", "run_id": "runs", "item_id": "golden",
    "user_id": "users", "conversation_id": "conversations", "parent_id": "messages",
    "model_id": "models", "experiment_id": "experiments", "candidate": "versions",
}  # fmt: skip


def seed(live: Live, auth: dict[str, str], tmp: Path) -> dict[str, list[str]]:
    """Real objects of every kind, made through the API as a user and an operator would."""
    http = live.http
    ids: dict[str, list[Any]] = {name: [] for name in {*ID_FIELDS.values(), "paths"}}
    for i in range(4):
        user = f"fuzz-user-{i}"
        body = {"messages": [{"role": "user", "content": f"Q{i}?"}], "n": 2, "user": user}
        answer = http.post("/v1/chat/completions", json=body, headers=auth).json()
        ids["completions"].append(answer["id"])
        ids["conversations"].append(answer["conversation_id"])
        ids["messages"] += [c["message_id"] for c in answer["choices"]]
        ids["users"].append(user)
        pick = {"completion_id": answer["id"], "type": "pick", "chosen_index": i % 2, "user": user}
        assert http.post("/v1/feedback", json=pick, headers=auth).status_code == 201
    assert http.post("/v1/operator/pairs/compile", headers=auth).status_code == 200
    ids["pairs"] = [p["id"] for p in http.get("/v1/operator/pairs", headers=auth).json()["data"]]
    assert live.model_dir is not None
    for i in range(3):
        adapter = make_adapter(live.model_dir, tmp / "imports" / f"a{i}", seed=i)
        ids["paths"].append(str(adapter))
        files = {
            name: (path.name, path.read_bytes())
            for name, path in (
                ("config", adapter / "adapter_config.json"),
                ("weights", adapter / "adapter_model.safetensors"),
            )
        }
        r = http.post("/v1/operator/adapters/upload", files=files, headers=auth)
        assert r.status_code == 201, r.text
        ids["versions"].append(r.json()["id"])
    for vid in ids["versions"][:2]:
        http.post(f"/v1/operator/adapters/{vid}/approve", headers=auth).raise_for_status()
    http.post(f"/v1/operator/adapters/{ids['versions'][0]}/promote", headers=auth)
    canary = {"candidate": ids["versions"][1], "share": 0.5}  # a live canary against the first
    r = http.post("/v1/operator/experiments", json=canary, headers=auth)
    assert r.status_code == 201, r.text
    ids["experiments"].append(r.json()["id"])
    for i in range(2):
        item = {"prompt": f"Say {i}.", "checks": {"contains": [str(i)]}}
        assert http.put(f"/v1/operator/golden/g{i}", json=item, headers=auth).status_code == 200
        ids["golden"].append(f"g{i}")
    ids["models"] = [m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]]
    db = create_engine(live.db_url)
    ids["runs"] = [create_run(db, segment="default", trigger="api", actor="fuzz").id]
    return ids


def made_real(case: Any, ids: dict[str, list[Any]], k: int) -> Any:
    """Point the case's path parameters and top-level body fields at real objects, and mend
    what JSON Schema cannot say (the last message is the user's, a golden check is one the
    gate knows, an adapter is a real one), so the operation's own logic runs."""
    for name, value in list((case.path_parameters or {}).items()):
        if name in ID_FIELDS:
            pool = ids[ID_FIELDS[name]]
            case.path_parameters[name] = pool[k % len(pool)] if pool else value
    if isinstance(case.body, dict):
        for name in case.body.keys() & ID_FIELDS.keys():
            pool = ids[ID_FIELDS[name]]
            case.body[name] = pool[k % len(pool)] if pool else case.body[name]
        if "ids" in case.body and isinstance(case.body["ids"], list):
            case.body["ids"] = ids["pairs"][: 1 + k % 3]
        if case.operation.path == "/v1/chat/completions":
            mend_chat(case.body)
        if case.operation.path == "/v1/operator/experiments":  # the service's own policy, and
            case.body.pop("policy", None)  # a share (none is configured here)
            case.body.pop("expect_incumbent", None)
            case.body["share"] = case.body.get("share") or 0.5
        if "checks" in case.body:  # a golden item: one prompt, one check the gate knows
            case.body.update(checks={"contains": ["a"]}, prompt="Say a.")
            case.body.pop("messages", None)
        if "path" in case.body:
            case.body["path"] = ids["paths"][k % len(ids["paths"])]
        if "weights" in case.body:
            adapter = Path(ids["paths"][k % len(ids["paths"])])
            case.body["config"] = (adapter / "adapter_config.json").read_bytes()
            case.body["weights"] = (adapter / "adapter_model.safetensors").read_bytes()
    return case


def mend_chat(body: dict[str, Any]) -> None:
    """A chat request the service can answer: a user message last, within the limits the
    settings set (beyond the schema), without the features it refuses."""
    if not body.get("regenerate"):
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)):
            body["messages"] = messages = [{"role": "user", "content": "Hi"}]
        messages[-1].update(role="user")
    for name in ("tools", "logprobs", "logit_bias"):
        body.pop(name, None)
    for name, most in (("n", 2), ("max_tokens", 8), ("max_completion_tokens", 8)):
        if isinstance(body.get(name), int | float):
            body[name] = max(1, min(int(body[name]), most))


def test_api_never_errors_and_matches_its_schema(live: Live, tmp_path: Path) -> None:
    _row, secret = create_key(create_engine(live.db_url), name="fuzzer", role="admin")
    auth = {"Authorization": f"Bearer {secret}"}
    ids = seed(live, auth, tmp_path)
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json")
    stats: Counter[str] = Counter()
    reached: dict[str, Counter[int]] = {}  # operation -> status codes
    failures: dict[tuple[str, str], str] = {}  # (operation, problem) -> an example

    for result in schema.get_all_operations():
        operation = result.ok()
        reached[operation.label] = Counter()
        for mode, examples in EXAMPLES.items():
            cases = operation.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                cases = st.tuples(cases, st.integers(0, 99), st.booleans()).map(
                    lambda t: made_real(t[0], ids, t[1]) if t[2] else t[0]
                )

            @given(case=cases)
            @hypothesis_settings(
                max_examples=examples,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,  # the same requests every run
                database=None,
            )
            def fuzz(case: Any) -> None:
                response = case.call(headers=auth, timeout=60)
                stats["requests"] += 1
                stats[f"{response.status_code // 100}xx"] += 1
                reached[case.operation.label][response.status_code] += 1
                try:
                    case.validate_response(
                        response, headers=auth, excluded_checks=[positive_data_acceptance]
                    )
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported below
                    parts = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
                    problem = "; ".join(
                        getattr(e, "title", None) or str(e).splitlines()[0] for e in parts
                    )[:300]
                    failures.setdefault(
                        (case.operation.label, problem),
                        f"{case.method} {case.formatted_path} query={case.query} "
                        f"body={str(case.body)[:200]!r} "
                        f"-> {response.status_code} {response.text[:300]}",
                    )

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
                assert mode is GenerationMode.NEGATIVE, operation.label

    # Reached: some request got past validation, authorisation and the lookup of what it names
    # into the operation's own logic (a success, or a refusal of the state it found: 409).
    unreached = {
        op: dict(codes) for op, codes in reached.items()
        if not any(200 <= c < 300 or c == 409 for c in codes)
    }  # fmt: skip
    print(f"\nfuzzing: {stats['requests']} requests to {len(reached)} operations; by class "
          f"{dict(sorted((k, v) for k, v in stats.items() if k.endswith('xx')))}; "
          f"problems: {len(failures)}; not reached: {unreached}")  # fmt: skip
    assert stats["5xx"] == 0 and not failures, "\n".join(
        f"{op}: {problem}\n    e.g. {example}" for (op, problem), example in failures.items()
    )
    assert not unreached, unreached
