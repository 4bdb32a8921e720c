"""Every command in the README and the docs runs as written, against a server started the way the
README says (`make run`).

Each page's `sh` blocks run in one bash, in order (a variable set in one block is there in the
next), its `python` blocks in one interpreter; a failing command or an HTTP error fails the
page. A block that cannot run here says why in a `<!-- docs-test: skip "..." -->` line just
above it (hidden in the rendered page).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:^[ \t]*<!-- docs-test: skip \"(?P<skip>[^\"]+)\" -->\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
    re.M | re.S,
)
RUNNABLE = {"sh": "sh", "bash": "sh", "python": "python"}
# `curl` as pasted, but failing on an HTTP error status (after printing the error body).
SHELL_PRELUDE = 'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; }\n'

pytestmark = pytest.mark.slow


@dataclass
class Block:
    page: str
    lang: str
    code: str
    skip: str | None
    line: int


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        indent = len(m["indent"])
        code = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
        line = text.count("\n", 0, m.start("lang")) + 1
        found.append(Block(page.name, m["lang"], code, m["skip"], line))
    return found


def test_every_shell_and_python_block_is_run_or_says_why_not() -> None:
    """The extraction itself: no runnable block slips through unlabelled, and the skips are few
    and all explained."""
    every = [b for page in PAGES for b in blocks(page)]
    runnable = [b for b in every if b.lang in RUNNABLE]
    skipped = [b for b in runnable if b.skip]
    unlabelled = [f"{b.page}:{b.line}" for b in every if not b.lang]
    assert not unlabelled, f"code blocks without a language (sh, python, text...): {unlabelled}"
    assert len(runnable) - len(skipped) >= 15
    # In the README only the two commands themselves: `make run` is how the server the others
    # run against is started, `make test` runs this test.
    readme_skips = [b for b in skipped if b.page == "README.md"]
    assert [b.code.split()[:2] for b in readme_skips] == [["make", "run"]]


@dataclass
class Live:
    port: int
    env: dict[str, str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Live]:
    """`make run`, as the README's first command, with its own database and adapter store (the
    prepared model is shared with the other tests through the default home)."""
    tmp = tmp_path_factory.mktemp("docs")
    port = free_port()
    env = {
        **os.environ,
        "PREFLOOP_PORT": str(port),
        "PREFLOOP_DATABASE_URL": f"sqlite:///{tmp / 'prefloop.db'}",
        "PREFLOOP_ADAPTERS_PATH": str(tmp / "adapters"),
        "PREFLOOP_HOME": str(smollm2_dir.parent.parent),  # where make run finds the model
    }
    env.pop("PREFLOOP_MODEL", None)
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["make", "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port}", timeout=300, proc=proc)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- make run ---\n{log.read_text()}") from exc
        work = tmp / "work"
        work.mkdir()
        (work / ".venv").symlink_to(ROOT / ".venv")  # the commands run "in the repository"
        yield Live(port=port, env={**env, "PWD": str(work), "WORK": str(work)})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run(live: Live, lang: str, code: str) -> subprocess.CompletedProcess:
    code = re.sub(r"(127\.0\.0\.1|localhost):8000\b", f"127.0.0.1:{live.port}", code)
    if lang == "sh":
        argv = ["bash", "-c", SHELL_PRELUDE + code]
    else:
        argv = [sys.executable, "-c", code]
    return subprocess.run(
        argv, cwd=live.env["WORK"], env=live.env, capture_output=True, text=True, timeout=600
    )


def _pages_with_commands() -> list[Path]:
    return [p for p in PAGES if any(b.lang in RUNNABLE and not b.skip for b in blocks(p))]


@pytest.mark.parametrize("page", _pages_with_commands(), ids=lambda p: p.name)
def test_the_commands_on_a_page_run_as_written(live: Live, page: Path) -> None:
    runnable = [b for b in blocks(page) if RUNNABLE.get(b.lang) and not b.skip]
    for lang in ("python", "sh"):
        mine = [b for b in runnable if RUNNABLE[b.lang] == lang]
        if not mine:
            continue
        # One script per language: each block starts on a new line; failures name the block.
        code = "".join(f"\n# --- {b.page}:{b.line}\n{b.code}" for b in mine)
        done = _run(live, lang, code)
        assert done.returncode == 0, (
            f"{page.name}: the {lang} blocks failed (exit {done.returncode})\n"
            f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
        )
