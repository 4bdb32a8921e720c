"""The golden set: prompts an operator wants answered a certain way, and checks on the answers.

JSONL, one item per line::

    {"id": "capital-fr",
     "messages": [{"role": "user", "content": "What is the capital of France?"}],
     "checks": {"contains": ["Paris"], "not_contains": ["London"], "regex": "^The",
                "max_chars": 200}}

``"prompt": "..."`` may stand for one user message. Every check is optional but an item needs at
least one. ``contains``/``not_contains`` match case-insensitively; ``regex`` is a Python pattern
applied with ``re.search`` (case-sensitive unless the pattern says ``(?i)``).

No torch here: the web service imports this module to validate what operators send.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
CHECK_KEYS = ("contains", "not_contains", "regex", "max_chars")


class GoldenError(ValueError):
    """A golden item or file is malformed; the message names the field (and line)."""


@dataclass(frozen=True)
class Checks:
    contains: tuple[str, ...] = ()
    not_contains: tuple[str, ...] = ()
    regex: str | None = None
    max_chars: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.contains:
            out["contains"] = list(self.contains)
        if self.not_contains:
            out["not_contains"] = list(self.not_contains)
        if self.regex is not None:
            out["regex"] = self.regex
        if self.max_chars is not None:
            out["max_chars"] = self.max_chars
        return out


@dataclass(frozen=True)
class GoldenItem:
    id: str
    messages: tuple[dict[str, str], ...]  # the conversation; the last message is the user's
    checks: Checks

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "messages": [dict(m) for m in self.messages],
            "checks": self.checks.to_json(),
        }


def parse_messages(value: Any, field: str = "messages") -> tuple[dict[str, str], ...]:
    """A conversation that asks for an answer: {role, content} dicts, the last from the user."""
    if not isinstance(value, list) or not value:
        raise GoldenError(f"{field}: must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise GoldenError(f"{field}[{i}]: must be a {{role, content}} object, content a string")
        if m.get("role") not in ROLES:
            raise GoldenError(f"{field}[{i}].role: must be one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise GoldenError(f"{field}: the last message must be from the user")
    return tuple(out)


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise GoldenError(f"{field}: must be a non-empty list of non-empty strings")
    return tuple(value)


def parse_checks(value: Any) -> Checks:
    if not isinstance(value, dict):
        raise GoldenError("checks: must be an object")
    unknown = sorted(set(value) - set(CHECK_KEYS))
    if unknown:
        raise GoldenError(f"checks: unknown key(s) {', '.join(unknown)}")
    if not value:
        raise GoldenError(f"checks: at least one of {', '.join(CHECK_KEYS)} is required")
    regex = value.get("regex")
    if regex is not None:
        if not isinstance(regex, str):
            raise GoldenError("checks.regex: must be a string")
        try:
            re.compile(regex)
        except re.error as e:
            raise GoldenError(f"checks.regex: {e}") from e
    max_chars = value.get("max_chars")
    # bool is an int in Python; `true` is no length.
    if max_chars is not None and (
        not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars <= 0
    ):
        raise GoldenError("checks.max_chars: must be a positive integer")
    return Checks(
        contains=_strings(value["contains"], "checks.contains") if "contains" in value else (),
        not_contains=(
            _strings(value["not_contains"], "checks.not_contains")
            if "not_contains" in value
            else ()
        ),
        regex=regex,
        max_chars=max_chars,
    )


def parse_item(obj: Any) -> GoldenItem:
    """One golden item from its JSON form; ``GoldenError`` names the first bad field."""
    if not isinstance(obj, dict):
        raise GoldenError("item: must be an object")
    unknown = sorted(set(obj) - {"id", "messages", "prompt", "checks"})
    if unknown:  # a typo such as "check" would otherwise drop the checks silently
        raise GoldenError(f"item: unknown key(s) {', '.join(unknown)}")
    if not isinstance(obj.get("id"), str) or not obj["id"].strip():
        raise GoldenError("id: must be a non-empty string")
    if ("messages" in obj) == ("prompt" in obj):
        raise GoldenError("messages: give either messages or prompt (a string), not both")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise GoldenError("prompt: must be a non-empty string")
        messages = ({"role": "user", "content": obj["prompt"]},)
    else:
        messages = parse_messages(obj["messages"])
    if "checks" not in obj:
        raise GoldenError("checks: required")
    return GoldenItem(id=obj["id"], messages=messages, checks=parse_checks(obj["checks"]))


def parse_golden(text: str, source: str = "golden") -> list[GoldenItem]:
    """Items from JSONL text; errors start with ``source:line``. Ids must be unique."""
    items: list[GoldenItem] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = parse_item(json.loads(line))
        except json.JSONDecodeError as e:
            raise GoldenError(f"{source}:{lineno}: not JSON ({e})") from e
        except GoldenError as e:
            raise GoldenError(f"{source}:{lineno}: {e}") from e
        if item.id in first_line:
            first = first_line[item.id]
            raise GoldenError(
                f"{source}:{lineno}: id: duplicate {item.id!r} (first on line {first})"
            )
        first_line[item.id] = lineno
        items.append(item)
    return items


# The default golden set: 113 short factual and safety items SmolLM2-135M-Instruct answers
# reliably (screened by sampling; see docs/learning.md). Operators add to it or replace it.
SHIPPED_GOLDEN = Path(__file__).with_name("golden.jsonl")


def load_golden(path: Path | str) -> list[GoldenItem]:
    """The golden set at ``path``; a missing file is an empty set (none written yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return parse_golden(path.read_text(encoding="utf-8"), source=str(path))


def save_golden(path: Path | str, items: Iterable[GoldenItem]) -> None:
    """Write the set atomically: readers see the old file or the new one, never half of one."""
    path = Path(path)
    items = list(items)
    ids = [item.id for item in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise GoldenError(f"id: duplicate {', '.join(map(repr, dupes))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def failed_checks(answer: str, checks: Checks) -> list[str]:
    """What ``answer`` fails, one human-readable line per check; empty means it passes."""
    failed = []
    folded = answer.casefold()
    failed += [f'must contain "{s}"' for s in checks.contains if s.casefold() not in folded]
    failed += [f'must not contain "{s}"' for s in checks.not_contains if s.casefold() in folded]
    if checks.regex is not None and re.search(checks.regex, answer) is None:
        failed.append(f"must match /{checks.regex}/")
    if checks.max_chars is not None and len(answer) > checks.max_chars:
        failed.append(f"{len(answer)} chars > max {checks.max_chars}")
    return failed
