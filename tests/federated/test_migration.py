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
