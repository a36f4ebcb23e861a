"""What a contributor runs: the coordinator's HTTP client, the CLI commands, and the Flower
client app for federated rounds. Talks to the coordinator over HTTP only."""
