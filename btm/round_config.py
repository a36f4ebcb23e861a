"""A federated round's settings and their defaults, in one place: the coordinator's API
(RoundIn) and its ServerApp, the `elmforest round start` options and the typed client's
start_round all read them from here. Plain data with no torch, like TrainConfig, whose
defaults the training fields take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from btm.train_config import TrainConfig


@dataclass
class RoundConfig:
    """A round's settings (the Round row's `config`); every field has a default."""

    min_nodes: int = 1  # start once this many nodes are connected ...
    node_wait_s: float = 60.0  # ... or after this long with at least one
    query_timeout_s: float = 120.0  # the nodes' answer to "your domain and data size?"
    branch_timeout_s: float = 1800.0  # each node scores its data under every ELM of the forest
    init_timeout_s: float = 1800.0  # the coordinator computes the branch inits (a job)
    train_timeout_s: float = 6 * 3600.0  # train and upload; the round's main time-out
    max_attempts: int = 3  # rounds in a row a domain may fail before it is no longer asked
    # how each node trains: the fields of TrainConfig.RECORD, with TrainConfig's defaults
    # (TrainConfig has no default length: a round's is its own)
    steps: int = 500
    batch_size: int = TrainConfig.batch_size
    block_size: int = TrainConfig.block_size
    lr: float = TrainConfig.lr
    warmup: float = TrainConfig.warmup
    precision: str = TrainConfig.precision

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RoundConfig:
        known = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def training(self) -> TrainConfig:
        return TrainConfig(**{k: getattr(self, k) for k in TrainConfig.RECORD})

    def train_record(self) -> dict[str, Any]:
        """The "train" record of a train message (protocol.TRAIN_KEYS)."""
        return self.training().to_record()

