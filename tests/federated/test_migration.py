"""Migrations: `elmforest db upgrade` makes the schema exactly what the models declare, on
SQLite and PostgreSQL, and downgrading (here: past the rounds tables) and upgrading again
works."""

import pytest
from live import pg_database  # noqa: F401 - a fixture


def _check(url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect

    from coordinator import migrate
    from coordinator.db import get_engine
    from coordinator.models import Base

    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    engine = get_engine(url)
    with engine.connect() as c:
        diffs = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diffs == []
    assert {"rounds", "round_nodes"} <= set(inspect(engine).get_table_names())
    migrate.downgrade(url, "0001")
    assert not {"rounds", "round_nodes"} & set(inspect(engine).get_table_names())
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()


def test_migrations_on_sqlite(tmp_path):
    _check(f"sqlite:///{tmp_path / 'db.sqlite'}")


@pytest.mark.postgres
def test_migrations_on_postgres(pg_database):  # noqa: F811
    _check(pg_database)


def test_a_version_evaluated_before_evaluated_at_existed_gets_it(tmp_path):
    """Migration 0007: a leaderboard shows only versions whose evaluation is recorded as done,
    so versions evaluated before 0005 are marked; unevaluated ones stay unmarked."""
    from coordinator import migrate
    from coordinator.db import session_scope
    from coordinator.models import Domain, Evaluation, Forest, ForestVersion

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    with session_scope(url) as db:
        f = Forest(name="ff", family="gpt2", config={}, tokenizer_sha256="0" * 64, seed_files={})
        d = Domain(name="python")
        done, fresh = (ForestVersion(forest=f, number=n, manifest={}, manifest_sha256="0" * 64) for n in (1, 2))
        db.add_all([f, d, done, fresh])
        db.flush()
        db.add(Evaluation(version_id=done.id, subject="python", kind="elm", domain_id=d.id, method="elm",
                          perplexity=9.0, tokens=100))
    migrate.downgrade(url, "0006")
    migrate.upgrade(url)
    with session_scope(url) as db:
        marked = {v.number: v.evaluated_at is not None for v in db.query(ForestVersion)}
    assert marked == {1: True, 2: False}
