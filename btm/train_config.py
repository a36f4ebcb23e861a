"""How one training phase runs: its length, batch, learning-rate schedule and the like. Plain
data with no torch, so the CLI, the coordinator and a federated node can all build and pass
it around cheaply; btm.train runs it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    steps: int  # optimizer updates in this phase
    batch_size: int = 32  # global batch, in sequences
    micro_batch_size: int | None = None  # per process per forward; default: as large as allowed
    block_size: int = 256
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: float = 0.08  # fraction of the schedule
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # The LR schedule this phase runs in: steps [schedule_start, schedule_start + steps) of a
    # schedule `schedule_steps` long (default: just this phase).
    schedule_start: int = 0
    schedule_steps: int | None = None
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    progress: bool = True

    # What travels with a federated round's train message, by its wire name (Flower config
    # records use hyphens): the coordinator writes it from a round's settings, the node reads
    # its TrainConfig back from it.
    RECORD = {"steps": int, "batch_size": int, "block_size": int, "lr": float, "warmup": float, "precision": str}

    def to_record(self) -> dict[str, int | float | str]:
        return {k.replace("_", "-"): cast(getattr(self, k)) for k, cast in self.RECORD.items()}

    @classmethod
    def from_record(cls, record: dict, **overrides) -> TrainConfig:
        fields = {k: cast(record[k.replace("_", "-")]) for k, cast in cls.RECORD.items()
                  if k.replace("_", "-") in record}
        return cls(**{**fields, **overrides})

    @property
    def total_schedule(self) -> int:
        return self.schedule_steps or (self.schedule_start + self.steps)

    def lr_at(self, global_step: int) -> float:
        total = self.total_schedule
        warm = max(1, round(self.warmup * total)) if self.warmup > 0 else 0
        if global_step < warm:
            return self.lr * (global_step + 1) / warm
        frac = (global_step - warm) / max(1, total - warm)
        return self.min_lr + (self.lr - self.min_lr) * max(0.0, 1.0 - frac)
