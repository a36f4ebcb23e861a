"""The `elmforest` command, and the one place that wires the packages together: each package
contributes its own commands; the coordinator serves its API with the web pages mounted
(create_app below) and runs federated rounds with the contributor's Flower ClientApp.

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


CLIENT_APP = "contributor_client.flower:app"  # what a node of a federated round runs


def create_app():
    """The coordinator's API with the web pages mounted: what `elmforest serve` runs."""
    from coordinator.app import create_app as api
    from web.routes import mount

    return api(extend=mount)


def _register() -> None:
    from btm import cli as btm_cli
    from contributor_client import cli as client_cli
    from coordinator import cli as coordinator_cli

    btm_cli.register(app)
    coordinator_cli.register(app, app_factory="elmforest_cli:create_app", client_app=CLIENT_APP)
    client_cli.register(app)
    # `elmforest branch` branches locally; `elmforest branch request` asks a coordinator
    btm_cli.branch_app.command("request")(client_cli.branch_request)


_register()


def main() -> None:
    from btm.errors import BTMError
    from contributor_client.http import ClientError

    try:
        app()
    except (BTMError, ClientError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
