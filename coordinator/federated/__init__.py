"""Federated BTM rounds over Flower (server side).

A maintainer creates a round (API or `elmforest round start`); a Flower ServerApp
(`coordinator.federated.server:app`) runs it over the connected Flower nodes, whose
ClientApp is `contributor_client.flower:app`. Modules:

  protocol.py  the message types and record keys both sides speak
  logic.py     the round's decisions as plain functions (which node trains, retries, status)
  server.py    the ServerApp: the round driver over a Flower Grid
  local.py     an in-process Grid that calls ClientApps directly (simulation on one machine, tests)

The Flower App handed to `flwr run` is written by the maintainer's client
(contributor_client/flower_run.py).

See docs/federated.md.
"""
