"""Fuzzing: schemathesis generates requests, valid and invalid, from the service's own OpenAPI
schema and sends them to the live app (uvicorn, tiny random Llama, SQLite). No response may be
a 5xx, and every response must match the schema (documented status code, content type,
headers, body); invalid input must be refused, and a bad key too.

Not checked: that every schema-valid request succeeds ("positive data acceptance"). Some rules
are beyond JSON Schema and answer 400 by design: the last message must be the user's, the
prompt must fit the model's context, a registered path must be an adapter directory on the
server, a golden check's regex must compile."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import create_engine

from service.auth import create_key
from tests.service.conftest import Live

# Hundreds of generated requests through real HTTP.
pytestmark = pytest.mark.slow

EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}  # per operation


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
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
    }


def test_api_never_errors_and_matches_its_schema(live: Live) -> None:
    _row, secret = create_key(create_engine(live.db_url), name="fuzzer", role="admin")
    auth = {"Authorization": f"Bearer {secret}"}
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json")
    stats: Counter[str] = Counter()
    failures: dict[tuple[str, str], str] = {}  # (operation, problem) -> an example

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in EXAMPLES.items():

            @given(case=operation.as_strategy(generation_mode=mode))
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

    print(f"\nfuzzing: {stats['requests']} requests; by class "
          f"{dict(sorted((k, v) for k, v in stats.items() if k.endswith('xx')))}; "
          f"problems: {len(failures)}")  # fmt: skip
    assert stats["5xx"] == 0 and not failures, "\n".join(
        f"{op}: {problem}\n    e.g. {example}" for (op, problem), example in failures.items()
    )
