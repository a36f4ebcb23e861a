"""Alembic environment: the URL comes from the caller's config (coordinator.migrate) or,
when run as `alembic` directly, from the settings (ELMFOREST_DATABASE_URL)."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from coordinator.models import Base

config = context.config
if not config.get_main_option("sqlalchemy.url"):
    from coordinator.settings import get_settings

    config.set_main_option("sqlalchemy.url", get_settings().db_url.replace("%", "%%"))


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        context.configure(connection=given, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
