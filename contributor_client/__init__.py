"""What a contributor runs: the coordinator's API as one typed Python class (`Coordinator`),
the CLI commands over it, and the Flower client app for federated rounds. Talks to the
coordinator over HTTP only."""

from contributor_client.api import Coordinator
from contributor_client.http import ClientError

__all__ = ["ClientError", "Coordinator"]
