"""Shared fixtures: the real SmolLM2 model (prepared once into a shared cache) and tiny random
Llama models built from a config in code for fast tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests run torch in this process, servers and trainer subprocesses at once: spinning OpenMP
# waits would make them starve each other (see service.cli.main). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The prepared model is cached across test runs (and CI steps) under this home.
TEST_HOME = Path(os.environ.get("PREFLOOP_TEST_HOME", "~/.cache/prefloop")).expanduser()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors HF directory."""
    from service.engines.modelprep import prepare_default_model

    return prepare_default_model(TEST_HOME / "models", progress=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random, non-trivial weights (B is not zero) saved in PEFT layout:
    adapters made with different seeds answer differently, even greedily."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out


# --- databases: a SQLite file, or the real Postgres server (#9) --------------------------------
# Each test session works in a database of its own (other test runs may share the server), and
# each test in a schema of its own inside it, so tests never see each other's rows.
PG_SERVER = os.environ.get("PREFLOOP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
# `db_backend` is "sqlite" unless a test is parametrized over BOTH_DATABASES, or
# PREFLOOP_TEST_DB=postgres runs everything on Postgres (`make test-postgres`).
DEFAULT_BACKEND = os.environ.get("PREFLOOP_TEST_DB", "sqlite")
BOTH_DATABASES = pytest.mark.parametrize(
    "db_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With PREFLOOP_TEST_DB=postgres (`make test`'s second pass, `make test-postgres`) only the
    tests that use a database run, on Postgres, minus those parametrized over both databases:
    those, and every test without a database, ran in the first pass already."""
    if DEFAULT_BACKEND != "postgres":
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        uses_db = "db_url" in getattr(item, "fixturenames", ())
        (keep if uses_db and "db_backend" not in params else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of this session's own on the Postgres server, dropped at the end."""
    import secrets

    import psycopg

    name = f"prefloop_t_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"Postgres is not reachable at {PG_SERVER} ({exc}); `make test` starts it "
            "(tests/postgres-up.sh), or set PREFLOOP_TEST_PG"
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", DEFAULT_BACKEND)


@pytest.fixture
def db_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database for one test: a SQLite file, or a Postgres schema."""
    if db_backend == "sqlite":
        return f"sqlite:///{tmp_path / 'p.db'}"
    assert db_backend == "postgres", db_backend
    import secrets

    import psycopg
    from sqlalchemy.engine import make_url

    database = request.getfixturevalue("pg_database")
    server = make_url(PG_SERVER)
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(
        server.set(database=database).render_as_string(hide_password=False), autocommit=True
    ) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = server.set(
        drivername="postgresql+psycopg",
        database=database,
        query={"options": f"-csearch_path={schema}"},
    )
    return url.render_as_string(hide_password=False)
