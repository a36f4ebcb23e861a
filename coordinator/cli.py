"""`elmforest` commands that run the coordinator: serve, worker, db, user, round."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)

db_app = typer.Typer(help="The coordinator's database schema (Alembic).", no_args_is_help=True)
user_app = typer.Typer(help="Accounts on this coordinator (run where the database is).", no_args_is_help=True)
round_app = typer.Typer(help="Federated BTM rounds over Flower nodes (maintainers; see docs/federated.md).",
                        no_args_is_help=True)


# An idle keep-alive connection is closed after this long. Longer than a person's pause
# between pages or a client's poll interval: closing a connection at the moment its client
# reuses it loses that request ("server disconnected without sending a response"); uvicorn's
# 5 s lost about one request in 6,000 under the 200-client load.
KEEP_ALIVE_SECONDS = 65


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="API processes (production; needs a broker for jobs).")] = 1,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Do not run a job worker in this process.")] = False,
    migrate: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Upgrade the database schema first.")] = True,
):
    """Run the coordinator: the API under /api/v1, the web pages at /.

    With no settings it needs no servers: a SQLite database, a local artifact directory and
    a job queue under ELMFOREST_DATA_DIR, with a worker inside this process.

    EXAMPLES
      elmforest serve --port 8000
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
    uvicorn.run(_composed["app_factory"], factory=True, host=host, port=port, workers=workers,
                log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_SECONDS)
    # SIGTERM/Ctrl-C: uvicorn has stopped and the app has handed back its job in flight; end the
    # process now rather than wait on a job worker thread still busy with it
    import logging

    logging.shutdown()
    os._exit(0)


def worker(
    concurrency: Annotated[int, typer.Option(help="Jobs at a time.")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
):
    """Run a job worker (Celery) against the configured broker.

    EXAMPLES
      ELMFOREST_BROKER_URL=redis://127.0.0.1:6379/0 elmforest worker --concurrency 2
    """
    import os

    from coordinator.jobs.celery_app import app

    os.umask(0o077)
    # threads, not prefork: the jobs in flight live in this process, so a stop can hand them back
    app.worker_main(["worker", f"--concurrency={concurrency}", f"--loglevel={loglevel}",
                     "--pool=threads" if concurrency > 1 else "--pool=solo", "--without-gossip", "--without-mingle"])


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head"):
    """Apply migrations up to REVISION (default: the latest)."""
    from coordinator import migrate
    from coordinator.settings import get_settings

    migrate.upgrade(get_settings().db_url, revision)
    console.print(f"database at {migrate.current(get_settings().db_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]):
    """Revert migrations down to REVISION."""
    from coordinator import migrate
    from coordinator.settings import get_settings

    migrate.downgrade(get_settings().db_url, revision)


@db_app.command("current")
def db_current():
    """Print the database's revision and the code's."""
    from coordinator import migrate
    from coordinator.settings import get_settings

    print(f"database: {migrate.current(get_settings().db_url)}  code: {migrate.head()}")


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
    from coordinator.models import Role
    from coordinator.services import users
    from coordinator.settings import get_settings

    with session_scope(get_settings().db_url) as db:
        u = users.create_user(db, username, password, Role(role))
        _, secret = users.create_token(db, u, "created by admin")
    console.print(f"created {role} {username!r}; API token (shown once):")
    print(secret)


@user_app.command("set-role")
def user_set_role(username: str, role: str):
    """Change an account's role (contributor, maintainer, admin)."""
    from coordinator.db import session_scope
    from coordinator.models import Role
    from coordinator.services import users
    from coordinator.settings import get_settings

    with session_scope(get_settings().db_url) as db:
        users.set_role(db, username, Role(role))
    console.print(f"{username} is now {role}")


# ----------------------------------------------------------------------------- federated rounds

Url = Annotated[str | None, typer.Option("--url", envvar="ELMFOREST_URL", help="The coordinator (default: your login's).")]
Token = Annotated[str | None, typer.Option("--token", envvar="ELMFOREST_TOKEN", show_default=False,
                                           help="A maintainer's API token (default: your login's).")]
ACTIVE_ROUND = ("pending", "running")


def _api(url: str | None, token: str | None):
    """An HTTP client for the coordinator's API, with the login `elmforest login` stored."""
    import json
    import os
    from pathlib import Path

    import httpx

    if not (url and token):
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        f = Path(base) / "elmforest" / "credentials.json"
        saved = json.loads(f.read_text()) if f.exists() else {}
        url, token = url or saved.get("url") or "http://127.0.0.1:8000", token or saved.get("token")
    if not token:
        console.print("[red]error:[/red] log in as a maintainer first (`elmforest login`), or pass --token")
        raise typer.Exit(1)
    return httpx.Client(base_url=url.rstrip("/") + "/api/v1", headers={"authorization": f"Bearer {token}"}, timeout=60)


def _call(api, method: str, path: str, body: dict | None = None) -> dict | list:
    import httpx

    try:
        r = api.request(method, path, json=body)
    except httpx.HTTPError as e:
        console.print(f"[red]error:[/red] cannot reach the coordinator at {api.base_url}: {e}")
        raise typer.Exit(1) from None
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text[:500]
        console.print(f"[red]error:[/red] {msg}")
        raise typer.Exit(1)
    return r.json()


def _print_round(r: dict) -> None:
    from rich.table import Table

    console.print(f"round {r['id']}  forest {r['forest']}" + (f" v{r['version']}" if r["version"] else "")
                  + f"  [bold]{r['status']}[/bold]" + (f"  flower run {r['flower_run_id']}" if r["flower_run_id"] else "")
                  + (f"\n  [red]{r['error']}[/red]" if r["error"] else ""))
    if not r["nodes"]:
        return
    t = Table("node", "domain", "owner", "status", "contribution", "why", show_lines=False)
    for n in r["nodes"]:
        c = f"{n['contribution_id']} ({n['contribution_state']})" if n["contribution_id"] else ""
        t.add_row(n["node_id"], n["domain"] or "?", n["owner"] or "", n["status"], c, n["reason"])
    console.print(t)


@round_app.command("start")
def round_start(
    forest: Annotated[str, typer.Argument(help="The forest the round grows.")],
    superlink: Annotated[str | None, typer.Option(help="The SuperLink connection (a name in $FLWR_HOME/config.toml; "
                                                  "default: its default one).")] = None,
    node: Annotated[list[str] | None, typer.Option("--node", help="Simulate instead, on this machine: one in-process "
                                                   "node per --node, given as its node config, e.g. \"domain='python' "
                                                   "data-dir='/data/py' token-file='~/.tok'\" (needs the database).")] = None,
    steps: Annotated[int, typer.Option(help="Training updates per node.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Sequences per update.")] = 32,
    block_size: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
    min_nodes: Annotated[int, typer.Option(help="Start once this many nodes are connected...")] = 1,
    node_wait: Annotated[float, typer.Option(help="...or after this many seconds with at least one.")] = 60,
    query_timeout: Annotated[float, typer.Option(help="Seconds for the nodes to say their domain and data size.")] = 120,
    branch_timeout: Annotated[float, typer.Option(help="Seconds for the nodes to score their data and request inits.")] = 1800,
    init_timeout: Annotated[float, typer.Option(help="Seconds for the coordinator to compute the inits.")] = 1800,
    train_timeout: Annotated[float, typer.Option(help="Seconds for training and uploading (the round's time-out).")] = 6 * 3600,
    max_attempts: Annotated[int, typer.Option(help="Rounds in a row a domain may fail before it is no longer asked.")] = 3,
    note: Annotated[str, typer.Option(help="Why this round (kept with it).")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the round until it finishes.")] = True,
    url: Url = None,
    token: Token = None,
):
    """Start a synchronous BTM round over the connected Flower nodes.

    Every node branches from the forest, trains an ELM on its own domain and uploads it for
    validation, evaluation and review, as the node owner's contribution.

    The round is created at the coordinator (as you), then submitted to the SuperLink with
    `flwr run`; its ServerApp runs next to the SuperLink with the coordinator's settings.

    EXAMPLES
      elmforest round start demo --superlink federation --steps 300
      elmforest round start demo --node "domain='python' data-dir='data/python' token-file='alice.tok'" \\
        --node "domain='go' data-dir='data/go' token-file='bob.tok'" --steps 20     (simulated here)
    """
    import tempfile
    import time
    from pathlib import Path

    api = _api(url, token)
    body = {"forest": forest, "note": note, "steps": steps, "batch_size": batch_size, "block_size": block_size,
            "lr": lr, "min_nodes": min_nodes, "node_wait_s": node_wait, "query_timeout_s": query_timeout,
            "branch_timeout_s": branch_timeout, "init_timeout_s": init_timeout, "train_timeout_s": train_timeout,
            "max_attempts": max_attempts}
    r = _call(api, "POST", "/rounds", body)
    console.print(f"round {r['id']} created for forest {forest}")
    if node:
        from flwr.common.config import parse_config_args

        from coordinator.federated.local import simulate
        from coordinator.settings import get_settings

        configs = [parse_config_args([n]) for n in node]
        console.print(f"simulating {len(configs)} nodes in this process")
        _print_round(simulate(r["id"], configs, get_settings(), _composed["client_app"]))
        return
    from coordinator.federated import flwr_app

    with tempfile.TemporaryDirectory() as td:
        app_dir = flwr_app.write_app(Path(td) / flwr_app.APP_NAME, _composed["client_app"])
        try:
            run_id = flwr_app.submit(r["id"], app_dir, superlink)
        except (flwr_app.SubmitError, OSError) as e:
            _call(api, "POST", f"/rounds/{r['id']}/cancel")
            console.print(f"[red]error:[/red] {e}\n(round {r['id']} cancelled)")
            raise typer.Exit(1) from None
    console.print(f"submitted as Flower run {run_id}; follow it with `elmforest round status {r['id']}`")
    print(r["id"])
    if not wait:
        return
    seen = None
    submitted = time.monotonic()
    while r["status"] in ACTIVE_ROUND:
        time.sleep(3)
        r = _call(api, "GET", f"/rounds/{r['id']}")
        if r["status"] == "pending" and time.monotonic() - submitted > 300:
            console.print(f"[red]error:[/red] no ServerApp picked round {r['id']} up within 5 minutes; see "
                          f"`flwr log {run_id}` and the SuperLink's log (does it run with the coordinator's "
                          f"ELMFOREST_* settings?), then `elmforest round cancel {r['id']}`")
            raise typer.Exit(1)
        key = (r["status"], tuple((n["node_id"], n["status"]) for n in r["nodes"]))
        if key != seen:
            seen = key
            console.print(f"  {r['status']}: " + ", ".join(f"{n['domain'] or n['node_id']} {n['status']}" for n in r["nodes"]))
    _print_round(r)
    if r["status"] not in ("succeeded", "partial", "empty"):
        raise typer.Exit(1)


@round_app.command("status")
def round_status(
    round_id: Annotated[int | None, typer.Argument(help="A round (default: the recent ones).")] = None,
    forest: Annotated[str | None, typer.Option(help="Only this forest's rounds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    url: Url = None,
    token: Token = None,
):
    """A round's status and each node's part (or the recent rounds).

    EXAMPLES
      elmforest round status 3
      elmforest round status --forest demo --json
    """
    import json

    api = _api(url, token)
    if round_id is not None:
        data = _call(api, "GET", f"/rounds/{round_id}")
        rows = [data]
    else:
        data = _call(api, "GET", "/rounds" + (f"?forest={forest}" if forest else ""))
        rows = data
    if as_json:
        print(json.dumps(data, indent=2))
        return
    if not rows:
        console.print("no rounds yet (`elmforest round start FOREST`)")
    for r in rows:
        _print_round(r)


@round_app.command("cancel")
def round_cancel(round_id: Annotated[int, typer.Argument()], url: Url = None, token: Token = None):
    """Stop a pending or running round (ELMs already uploaded stay)."""
    _print_round(_call(_api(url, token), "POST", f"/rounds/{round_id}/cancel"))


# what the command that registers these wires in (see register): the web app to serve and the
# nodes' Flower ClientApp, as import strings (uvicorn's workers and Flower import them)
_composed = {"app_factory": "coordinator.app:create_app", "client_app": ""}


def register(app: typer.Typer, app_factory: str, client_app: str) -> None:
    """Add the operator's commands to `app`. `app_factory` (`module:function`) makes the
    application `serve` runs; `client_app` (`module:attribute`) is the ClientApp of the nodes
    of a federated round."""
    _composed.update(app_factory=app_factory, client_app=client_app)
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(db_app, name="db")
    app.add_typer(user_app, name="user")
    app.add_typer(round_app, name="round")
