"""One training loop for the seed LM, branch ELMs and the dense baseline.

Single process or `torchrun` (DDP) with the same code: the global batch is fixed, each rank
takes its rows of it (see data.BlockSampler) and gradient accumulation fills the rest. The
learning rate is a pure function of the global step (linear warm-up, then linear decay), and
batches are a pure function of the global step too, so a checkpoint needs only model,
optimizer, RNG and the step to resume exactly where it stopped.

A phase can continue another's schedule: the paper's compute-matched BTM takes the dense
run's first N/2 updates as the seed (same schedule, same optimizer state) and the branches
train the remaining N/2 updates of that schedule.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from btm.checkpoint import (
    CHECKPOINT,
    OPTIMIZER_FILE,
    checkpoint_optimizer,
    load_optimizer_state,
    read_checkpoint_state,
    save_checkpoint,
)
from btm.data import BlockSampler
from btm.errors import BTMError
from btm.family import Card, save_elm
from btm.model_files import CARD
from btm.safetensors_io import DTYPE_NAMES, read_header, read_tensor
from btm.train_config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Initialise torch.distributed when launched by torchrun, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local, device)


# --------------------------------------------------------------------------- optimizer I/O


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel is several times faster than the per-tensor loop, on CPU as on CUDA
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _load_state_into(model: torch.nn.Module, model_dir: Path) -> None:
    from btm.family import load_weights_into

    load_weights_into(model, model_dir)


# --------------------------------------------------------------------------- the loop


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model, block: torch.Tensor) -> torch.Tensor:
    # use_cache=False: training needs no key/value cache, and building one costs time
    out = model(input_ids=block[:, :-1], use_cache=False)
    logits = out.logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), block[:, 1:].reshape(-1))
    aux = getattr(out, "aux_loss", None)
    if aux is not None:  # a mixture of experts asked for its load-balancing loss: weighted as its config says
        loss = loss + getattr(model, "module", model).config.router_aux_loss_coef * aux
    return loss


def train(
    model: torch.nn.Module,
    tokenizer,
    sampler: BlockSampler,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    card: Card,
    init_optimizer: Path | None = None,
    dist_info: Dist | None = None,
    on_step=None,
) -> Path:
    """Train `model` for cfg.steps updates and save it as an ELM directory at out_dir.

    Resumes from out_dir/checkpoint when one exists (same config required). Returns out_dir.
    `on_step(step, metrics)` is called on the main process after every update.
    """
    d, out = _setup(model, cfg, out_dir, dist_info)
    opt = make_optimizer(model, cfg)
    start, last_loss, finished = _resume(out, model, opt, cfg, init_optimizer)
    if finished:
        model.eval()
        return out  # already done: running a finished phase again changes nothing
    micro, accum = _micro_batch_size(cfg, d)
    run_model = _wrap(model, cfg, d)  # runs forward/backward; `model` holds the same weights

    with _Log(out, cfg, d, card.name, start, last_loss, on_step) as log, _explain_resource_errors(out, micro, cfg):
        for step in range(start, cfg.steps):
            # LR and batch depend on the global step alone, so a resumed run sees the same ones
            gstep = cfg.schedule_start + step
            lr = cfg.lr_at(gstep)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = sampler.batch(gstep, cfg.batch_size, d.rank, d.world).to(d.device, non_blocking=True)
            loss_sum = torch.zeros((), device=d.device)
            for mb, sync in micro_batches(batch, micro, accum, run_model, d):
                with sync, _autocast(cfg, d.device):
                    loss = lm_loss(run_model, mb) / accum  # summed gradients = the mean over the batch
                    loss.backward()
                loss_sum += loss.detach()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            log.step(done, gstep, lr, loss_sum, gnorm)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                _checkpoint(out, model, opt, cfg, d, done, {"name": card.name, "loss": log.loss})

    if d.main:
        _save_trained(out, model, tokenizer, opt, cfg, card, log.loss, micro)
    if d.world > 1:
        dist.barrier()  # no process returns before the ELM is on disk
    model.eval()
    return out


def _setup(model: torch.nn.Module, cfg: TrainConfig, out_dir, dist_info: Dist | None) -> tuple[Dist, Path]:
    d = dist_info or setup_distributed()
    out = Path(out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    # a different stream per process, reproducible from the seed (a resume restores its state)
    torch.manual_seed(cfg.seed + d.rank)
    model.to(d.device)
    model.train()
    return d, out


def _resume(out: Path, model, opt, cfg: TrainConfig, init_optimizer) -> tuple[int, float, bool]:
    """Restore model, optimizer and RNG from out/checkpoint; returns (first step, last logged
    loss, finished). Without a checkpoint: step 0, with `init_optimizer`'s moments if given."""
    state = read_checkpoint_state(out)
    if state is None:
        if init_optimizer is not None:
            load_optimizer_state(model, opt, Path(init_optimizer))
        return 0, float("nan"), False
    ck = out / CHECKPOINT
    saved, mine = state["config"], asdict(cfg)
    # only the progress bar and how often to log and checkpoint may change between runs
    diff = [k for k in mine if k not in ("progress", "checkpoint_every", "log_every") and saved.get(k) != mine[k]]
    if diff:
        raise BTMError(
            f"{ck} was written with different settings ({', '.join(diff)}); "
            f"use another --out or delete {ck} to start over"
        )
    _load_state_into(model, ck)
    load_optimizer_state(model, opt, ck / OPTIMIZER_FILE)
    rh = read_header(ck / "rng.safetensors")
    torch.set_rng_state(read_tensor(rh.path, rh.tensors["torch"]))
    if "cuda" in rh.tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(read_tensor(rh.path, rh.tensors["cuda"]))
    start = int(state["step"])
    # finished only once the ELM itself was saved too (its README.md is written last)
    finished = bool(state.get("finished")) and start == cfg.steps and (out / CARD).exists()
    return start, float(state.get("loss", float("nan"))), finished


def _micro_batch_size(cfg: TrainConfig, d: Dist) -> tuple[int, int]:
    """(sequences per forward pass, forward passes per update) on each process: the global
    batch is fixed, so more processes mean less gradient accumulation, not a bigger batch."""
    per_rank = cfg.batch_size // d.world
    if cfg.batch_size % d.world:
        raise BTMError(f"--batch-size {cfg.batch_size} must be divisible by the {d.world} processes")
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise BTMError(f"per-process batch {per_rank} must be divisible by --micro-batch-size {micro}")
    return micro, per_rank // micro


def _wrap(model: torch.nn.Module, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    """The module that runs forward and backward: `model`, compiled and/or in DDP. Both share
    `model`'s parameters, which the optimizer, checkpoints and the saved ELM use."""
    run_model = torch.compile(model) if cfg.compile else model
    if d.world > 1:
        run_model = torch.nn.parallel.DistributedDataParallel(
            run_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None
        )
    return run_model


def micro_batches(batch: torch.Tensor, micro: int, accum: int, run_model, d: Dist):
    """This process's rows in `accum` slices of `micro`, each with the context to run its
    backward in: DDP all-reduces gradients on the last slice only, not on every one."""
    for i in range(accum):
        sync = contextlib.nullcontext() if (d.world == 1 or i == accum - 1) else run_model.no_sync()
        yield batch[i * micro : (i + 1) * micro], sync


class _Log:
    """metrics.jsonl, the progress bar and on_step, on the main process. The loss is averaged
    over processes only on logged steps (a sync point), so every process calls step()."""

    def __init__(self, out: Path, cfg: TrainConfig, d: Dist, name: str, start: int, loss: float, on_step):
        self.cfg, self.d, self.start, self.on_step = cfg, d, start, on_step
        self.loss = loss  # the last logged loss: what checkpoints and the card record
        self.file = open(out / "metrics.jsonl", "a") if d.main else None
        self.progress = self.task = None
        if d.main and cfg.progress:
            self.progress, self.task = _progress_bar(name, cfg.steps, start)
        self.tokens_per_step = cfg.batch_size * cfg.block_size
        self.t_last, self.steps_since = time.perf_counter(), 0

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()
        if self.file:
            self.file.close()

    def step(self, done: int, gstep: int, lr: float, loss_sum: torch.Tensor, gnorm) -> None:
        self.steps_since += 1
        if not (done % self.cfg.log_every == 0 or done == self.cfg.steps or done == self.start + 1):
            return
        if self.d.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.d.world
        self.loss = loss_sum.item()
        if not math.isfinite(self.loss):
            raise BTMError(f"loss became {self.loss} at step {done}; lower --lr or check the data")
        now = time.perf_counter()
        tps = self.steps_since * self.tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last, self.steps_since = now, 0
        rec = {"step": done, "global_step": gstep + 1, "loss": self.loss, "lr": lr, "tokens_per_s": tps,
               "grad_norm": float(gnorm) if gnorm is not None else None, "time": time.time()}
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.progress:
            self.progress.update(self.task, completed=done, loss=self.loss, tps=tps)
        if self.on_step and self.d.main:
            self.on_step(done, rec)


def _progress_bar(name: str, total: int, completed: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        transient=False,
    )
    progress.start()
    return progress, progress.add_task(name, total=total, completed=completed, loss=float("nan"), tps=0.0)


def _checkpoint(out: Path, model, opt, cfg: TrainConfig, d: Dist, done: int, extra: dict) -> None:
    """A resumable checkpoint mid-run, written by the main process; the others wait for it."""
    if d.main:
        save_checkpoint(out, model, opt, cfg, done, extra)
    if d.world > 1:
        dist.barrier()


def _save_trained(out: Path, model, tokenizer, opt, cfg: TrainConfig, card: Card, loss: float, micro: int) -> None:
    """The final checkpoint (branches carry its optimizer state; a rerun sees `finished`), then
    the ELM directory with what the training was recorded in its card."""
    with _explain_resource_errors(out, micro, cfg):
        save_checkpoint(out, model, opt, cfg, cfg.steps, {"name": card.name, "loss": loss, "finished": True})
        card.training = {
            **card.training,
            "updates": cfg.steps,
            "batch_size": cfg.batch_size,
            "block_size": cfg.block_size,
            "tokens": cfg.steps * cfg.batch_size * cfg.block_size,
            "lr": cfg.lr,
            "schedule": f"steps {cfg.schedule_start}..{cfg.schedule_start + cfg.steps} of {cfg.total_schedule}, "
            f"{cfg.warmup:.0%} warm-up, linear decay",
            "final_loss": round(loss, 4),
        }
        save_elm(model, tokenizer, out, card)


@contextlib.contextmanager
def _explain_resource_errors(out: Path, micro: int, cfg: TrainConfig):
    """GPU out of memory and a full disk, as instructions."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise BTMError(
            f"the GPU ran out of memory with {micro} sequences of {cfg.block_size} tokens per forward pass: "
            "lower --micro-batch-size (gradient accumulation keeps the global batch) or --block-size, and run "
            "the command again (it resumes from the last checkpoint)"
        ) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise BTMError(
                f"the disk is full while writing to {out}: free some space and run the command again; training "
                "resumes from the last complete checkpoint (a half-written one is never used)"
            ) from None
        raise


__all__ = ["DTYPE_NAMES", "Dist", "TrainConfig", "checkpoint_optimizer", "lm_loss", "setup_distributed", "train"]
