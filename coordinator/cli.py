"""`elmforest` commands that run the coordinator, where it runs: serve, worker, db, user."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)

db_app = typer.Typer(help="The coordinator's database schema (Alembic).", no_args_is_help=True)
user_app = typer.Typer(help="Accounts on this coordinator (run where the database is).", no_args_is_help=True)


# An idle keep-alive connection is closed after this long. Longer than a person's pause
# between pages or a client's poll interval: closing a connection at the moment its client
# reuses it loses that request ("server disconnected without sending a response"); uvicorn's
# 5 s lost about one request in 6,000 under the 200-client load.
KEEP_ALIVE_SECONDS = 65


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="API processes. On two cores, two served 400 requests/s of the "
                                         "load benchmark's mix where one served 340 (docs/results.md); a change made through one shows "
                                         "in the others' copies of published reads within "
                                         "ELMFOREST_RESPONSE_CACHE_SECONDS.")] = 1,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Start no job worker (run `elmforest worker` "
                                                               "yourself).")] = False,
    migrate: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Upgrade the database schema first.")] = True,
):
    """Run the coordinator: the API under /api/v1, the web pages at /.

    With no settings it needs no servers: a SQLite database, a local artifact directory and
    a job queue under ELMFOREST_DATA_DIR, with a job worker in a child process (the same as
    `elmforest worker`), stopped with the server and started again if it dies. With a broker
    (ELMFOREST_BROKER_URL) jobs go to `elmforest worker` processes run on their own.

    EXAMPLES
      elmforest serve --port 8000
      elmforest serve --workers 2           # two API processes (and one job worker)
      ELMFOREST_DATABASE_URL=postgresql+psycopg://u@db/elmforest ELMFOREST_BROKER_URL=redis://redis:6379/0 \\
        ELMFOREST_STORAGE_URL=s3://elmforest elmforest serve --host 0.0.0.0 --no-worker
    """
    import os

    import uvicorn

    from coordinator import migrate as mig
    from coordinator.settings import get_settings

    os.umask(0o077)  # everything this process writes (database, artifacts) is its owner's only
    s = get_settings()
    if migrate:
        mig.upgrade(s.db_url)
    if s.public_url == "http://127.0.0.1:8000" and (host, port) != ("127.0.0.1", 8000):
        os.environ["ELMFOREST_PUBLIC_URL"] = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        get_settings.cache_clear()
    if no_worker:
        os.environ["ELMFOREST_EMBEDDED_WORKER"] = "false"
        get_settings.cache_clear()
    console.print(f"coordinator on http://{host}:{port}  (data: {s.data_dir}, database: {s.db_url.split('@')[-1]})")
    child = None
    if s.embedded_broker and s.embedded_worker and not no_worker:
        from coordinator.jobs.supervisor import WorkerProcess

        child = WorkerProcess().start()
    _end_with(child)
    try:
        trusted = s.trusted_proxies or os.environ.get("FORWARDED_ALLOW_IPS", "")  # uvicorn's own name, as before
        uvicorn.run(_composed["app_factory"], factory=True, host=host, port=port, workers=workers,
                    log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                    # X-Forwarded-For and -Proto count only from the proxies named (none by default)
                    proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None)
    finally:
        _end(child)


def _end_with(child) -> None:
    """SIGTERM/Ctrl-C: uvicorn stops answering, then gives the signal back to the handler that
    was here before it: this one, which stops the job worker and ends the process."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: _end(child))


def _end(child) -> None:
    """Stop the worker child (it hands back its job in flight) and end the process now, rather
    than wait on the app's background threads."""
    import logging
    import os

    if child is not None:
        child.stop()
    logging.shutdown()
    os._exit(0)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head"):
    """Apply migrations up to REVISION (default: the latest).

    EXAMPLES
      elmforest db upgrade
      elmforest db upgrade 0004
    """
    from coordinator import migrate
    from coordinator.settings import get_settings

    migrate.upgrade(get_settings().db_url, revision)
    console.print(f"database at {migrate.current(get_settings().db_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]):
    """Revert migrations down to REVISION.

    EXAMPLES
      elmforest db downgrade 0005
    """
    from coordinator import migrate
    from coordinator.settings import get_settings

    migrate.downgrade(get_settings().db_url, revision)


@db_app.command("current")
def db_current():
    """Print the database's revision and the code's.

    EXAMPLES
      elmforest db current
    """
    from coordinator import migrate
    from coordinator.settings import get_settings

    print(f"database: {migrate.current(get_settings().db_url)}  code: {migrate.head()}")


def _role(name: str):
    from coordinator.errors import BadRequest
    from coordinator.models import Role

    try:
        return Role(name)
    except ValueError:
        raise BadRequest(f"unknown role {name!r}; a role is one of {', '.join(r.value for r in Role)}") from None


@user_app.command("create")
def user_create(
    username: Annotated[str, typer.Argument()],
    role: Annotated[str, typer.Option(help="contributor, maintainer or admin.")] = "contributor",
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)] = "",
):
    """Create an account and print an API token for it.

    EXAMPLES
      elmforest user create alice --role maintainer
    """
    from coordinator.db import session_scope
    from coordinator.services import users
    from coordinator.settings import get_settings

    with session_scope(get_settings().db_url) as db:
        u = users.create_user(db, username, password, _role(role))
        _, secret = users.create_token(db, u, "created by admin")
    console.print(f"created {role} {username!r}; API token (shown once):")
    print(secret)


@user_app.command("set-role")
def user_set_role(username: str, role: str):
    """Change an account's role (contributor, maintainer, admin).

    EXAMPLES
      elmforest user set-role alice maintainer
    """
    from coordinator.db import session_scope
    from coordinator.services import users
    from coordinator.settings import get_settings

    with session_scope(get_settings().db_url) as db:
        users.set_role(db, username, _role(role))
    console.print(f"{username} is now {role}")


# the application `serve` runs, as an import string (uvicorn's workers import it): set by
# the command that registers these (see register)
_composed = {"app_factory": "coordinator.app:create_app"}


def register(app: typer.Typer, app_factory: str, panel: str) -> None:
    """Add the operator's commands to `app`, under `panel`. `app_factory` (`module:function`)
    makes the application `serve` runs."""
    _composed["app_factory"] = app_factory
    app.command("serve", rich_help_panel=panel)(serve)
    from coordinator.jobs.worker import worker

    app.command("worker", rich_help_panel=panel)(worker)
    app.add_typer(db_app, name="db", rich_help_panel=panel)
    app.add_typer(user_app, name="user", rich_help_panel=panel)
