"""Alembic, configured from the settings (no alembic.ini needed to run it)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from coordinator.db import get_engine

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


class NotMigrated(RuntimeError):
    pass


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run(fn, url: str, revision: str) -> None:
    cfg = alembic_config(url)
    with get_engine(url).begin() as conn:  # our engine: SQLite pragmas, data directory created
        cfg.attributes["connection"] = conn
        fn(cfg, revision)


def upgrade(url: str, revision: str = "head") -> None:
    _run(command.upgrade, url, revision)


def downgrade(url: str, revision: str) -> None:
    _run(command.downgrade, url, revision)


def current(url: str) -> str | None:
    with get_engine(url).connect() as c:
        return MigrationContext.configure(c).get_current_revision()


def head() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def check_at_head(url: str) -> None:
    cur = current(url)
    if cur != head():
        raise NotMigrated(
            f"the database is at revision {cur or '(empty)'}, the code needs {head()}: run `elmforest db upgrade` first"
        )
