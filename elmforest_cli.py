"""The `elmforest` command, and the one place that wires the packages together: each package
contributes its own commands, grouped by who runs them; the coordinator serves its API with
the web pages mounted (create_app below), and `round start --node` simulates a federated
round's nodes in this process (simulate_round below).

Kept in one small module outside the packages so that no package imports another against
the arrows (web -> coordinator -> btm; contributor_client -> btm).
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="elmforest",
    help="Grow one language model as a forest of expert LMs (Branch-Train-Merge).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# the panels of `elmforest --help`: who runs the commands, and where
START = "Start here"
LOCAL = "Local BTM: your data, your machine"
OVER_HTTP = "Contributors and maintainers: a coordinator over HTTP"
OPERATIONS = "Coordinator operations: where it runs"


def create_app():
    """The coordinator's API with the web pages mounted: what `elmforest serve` runs."""
    from coordinator.app import create_app as api
    from web.routes import mount

    return api(extend=mount)


def simulate_round(round_id: int, node_configs: list[dict]) -> dict:
    """Run a created round here, each node an in-process ClientApp (needs the database)."""
    from contributor_client.flower_run import CLIENT_APP
    from coordinator.federated.local import simulate
    from coordinator.settings import get_settings

    return simulate(round_id, node_configs, get_settings(), CLIENT_APP)


def _register() -> None:
    from btm import cli as btm_cli
    from contributor_client import cli as client_cli
    from coordinator import cli as coordinator_cli

    app.command("demo", rich_help_panel=START)(client_cli.demo)
    btm_cli.register(app, LOCAL)
    client_cli.register(app, OVER_HTTP)
    coordinator_cli.register(app, "elmforest_cli:create_app", OPERATIONS)
    # `elmforest branch` branches locally; `elmforest branch request` asks a coordinator
    btm_cli.branch_app.command("request")(client_cli.branch_request)
    client_cli._simulate["round"] = simulate_round


_register()


def main() -> None:
    from btm.errors import BTMError
    from contributor_client.http import ClientError
    from coordinator.errors import ServiceError

    try:
        app()
    except (BTMError, ClientError, ServiceError) as e:  # bad input: the message says what to do
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
