"""What the ServerApp and the ClientApp say to each other. Flower carries control only:
names, counts, ids, URLs and checksums; never document text, never weights.

The node side (contributor_client/flower.py) keeps its own copy of these names, since the
contributor client must not import the coordinator; tests/federated check that they agree.

  query         server -> node  "round": {round-id, forest}
                node -> server  "node": {ok, domain, documents, bytes, owner, device, error}
  query.branch  server -> node  "branch": {round-id, forest, domain}
                (the node computes its domain posterior over the forest locally and asks its
                coordinator, with its owner's token, for a branch init)
                node -> server  "branch": {ok, branch-init-id, error}
  train         server -> node  "init": {round-id, forest, branch-init-id, name, files, urls}
                                  (files: JSON {filename: sha256}; urls: JSON {filename: URL})
                                "train": {steps, batch-size, block-size, lr, warmup, precision}
                node -> server  "result": {ok, contribution-id, state, name, error}
                                "metrics": {loss, steps, tokens, seconds}
"""

from __future__ import annotations

QUERY = "query"
BRANCH = "query.branch"
TRAIN = "train"

# record names
ROUND = "round"
NODE = "node"
BRANCH_REC = "branch"
INIT = "init"
TRAIN_REC = "train"
RESULT = "result"
METRICS = "metrics"

# the training settings a round sends (keys of the "train" record)
TRAIN_KEYS = ("steps", "batch-size", "block-size", "lr", "warmup", "precision")
