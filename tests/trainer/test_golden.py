"""The golden set: each malformed field named in its error, files round-tripped atomically, and
every kind of check judged on answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.golden import (
    Checks,
    GoldenError,
    GoldenItem,
    failed_checks,
    load_golden,
    parse_item,
    save_golden,
)

GOOD = {
    "id": "capital-fr",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "checks": {
        "contains": ["Paris"],
        "not_contains": ["London"],
        "regex": "^The",
        "max_chars": 200,
    },
}


def test_parse_item_full_and_shorthand() -> None:
    item = parse_item(GOOD)
    assert item == GoldenItem(
        id="capital-fr",
        messages=({"role": "user", "content": "What is the capital of France?"},),
        checks=Checks(contains=("Paris",), not_contains=("London",), regex="^The", max_chars=200),
    )
    assert item.to_json() == GOOD
    short = parse_item({"id": "a", "prompt": "Hi?", "checks": {"max_chars": 5}})
    assert short.messages == ({"role": "user", "content": "Hi?"},)
    assert short.to_json()["checks"] == {"max_chars": 5}  # unset checks are not written


def _with(**changes: object) -> dict:
    obj = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key.startswith("checks_"):
            obj["checks"][key.removeprefix("checks_")] = value
        elif value is None:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ("x", "item: must be an object"),
        (_with(check={}), "item: unknown key(s) check"),
        (_with(id=None), "id: must be a non-empty string"),
        (_with(id=" "), "id: must be a non-empty string"),
        (_with(id=3), "id: must be a non-empty string"),
        (_with(messages=None), "messages: give either messages or prompt"),
        (_with(prompt="Hi"), "messages: give either messages or prompt"),
        (_with(messages=None, prompt=""), "prompt: must be a non-empty string"),
        (_with(messages=[]), "messages: must be a non-empty list of {role, content}"),
        (_with(messages="hi"), "messages: must be a non-empty list of {role, content}"),
        (_with(messages=[{"role": "user"}]), "messages[0]: must be a {role, content} object"),
        (
            _with(messages=[{"role": "robot", "content": "x"}]),
            "messages[0].role: must be one of system, user, assistant",
        ),
        (
            _with(messages=[{"role": "assistant", "content": "x"}]),
            "messages: the last message must be from the user",
        ),
        (_with(checks=None), "checks: required"),
        (_with(checks=[]), "checks: must be an object"),
        (_with(checks={}), "checks: at least one of contains, not_contains, regex, max_chars"),
        (_with(checks_color="red"), "checks: unknown key(s) color"),
        (_with(checks_contains="Paris"), "checks.contains: must be a non-empty list"),
        (_with(checks_contains=[]), "checks.contains: must be a non-empty list"),
        (_with(checks_contains=["Paris", ""]), "checks.contains: must be a non-empty list"),
        (_with(checks_not_contains=[1]), "checks.not_contains: must be a non-empty list"),
        (_with(checks_regex="(unclosed"), "checks.regex: missing ), unterminated subpattern"),
        (_with(checks_regex=5), "checks.regex: must be a string"),
        (_with(checks_max_chars=0), "checks.max_chars: must be a positive integer"),
        (_with(checks_max_chars=2.5), "checks.max_chars: must be a positive integer"),
        (_with(checks_max_chars=True), "checks.max_chars: must be a positive integer"),
    ],
)
def test_parse_item_names_the_bad_field(obj: object, message: str) -> None:
    with pytest.raises(GoldenError) as e:
        parse_item(obj)
    assert str(e.value).startswith(message), str(e.value)


def test_save_load_round_trip(tmp_path: Path) -> None:
    items = [
        parse_item(GOOD),
        parse_item({"id": "é", "prompt": "Ça va ?", "checks": {"regex": "(?i)oui"}}),
        parse_item(
            {
                "id": "multi",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"},
                ],
                "checks": {"not_contains": ["sorry"]},
            }
        ),
    ]
    path = tmp_path / "sub" / "golden.jsonl"
    save_golden(path, items)
    assert load_golden(path) == items
    assert [p.name for p in path.parent.iterdir()] == ["golden.jsonl"]  # no temp file left
    save_golden(path, items[:1])  # replaces the whole file
    assert load_golden(path) == items[:1]
    assert load_golden(tmp_path / "missing.jsonl") == []


def test_load_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "golden.jsonl"
    other = {**GOOD, "id": "other"}
    path.write_text(f"{json.dumps(GOOD)}\n\n{json.dumps(other)}\n{json.dumps(GOOD)}\n")
    with pytest.raises(GoldenError, match=r"golden.jsonl:4: id: duplicate 'capital-fr' \(first"):
        load_golden(path)
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(GoldenError, match=r"golden.jsonl:2: not JSON"):
        load_golden(path)
    path.write_text(json.dumps(_with(checks_max_chars=-1)) + "\n")
    with pytest.raises(GoldenError, match=r"golden.jsonl:1: checks.max_chars: must be a posit"):
        load_golden(path)


def test_save_refuses_duplicate_ids(tmp_path: Path) -> None:
    item = parse_item(GOOD)
    with pytest.raises(GoldenError, match="id: duplicate 'capital-fr'"):
        save_golden(tmp_path / "golden.jsonl", [item, item])
    assert not list(tmp_path.iterdir())


def test_failed_checks_each_kind() -> None:
    checks = parse_item(GOOD).checks
    assert failed_checks("The capital of France is paris.", checks) == []  # case-insensitive
    assert failed_checks("The capital is Lyon, not LONDON.", checks) == [
        'must contain "Paris"',
        'must not contain "London"',
    ]
    assert failed_checks("Paris.", checks) == ["must match /^The/"]  # regex is case-sensitive
    assert failed_checks("the answer: Paris", checks) == ["must match /^The/"]
    assert failed_checks("The " + "Paris " * 80, checks) == ["484 chars > max 200"]
    assert failed_checks("oui", Checks(regex="(?i)OUI")) == []
    assert failed_checks("", Checks(contains=("a", "b"))) == [
        'must contain "a"',
        'must contain "b"',
    ]


def test_golden_imports_no_torch() -> None:
    """The web service imports this module to validate operator input: it must stay light."""
    code = "import sys, trainer.golden; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
