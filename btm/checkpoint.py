"""A training run's checkpoint: weights, AdamW moments (keyed by parameter name, as
safetensors: no pickle), RNG state and the step, replaced atomically. Branching reads the
optimizer state a trained model carries, so this sits below both the training loop and the
branch code."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from btm import atomic
from btm.errors import BTMError
from btm.model_files import OPTIMIZER, WEIGHTS_FILE
from btm.safetensors_io import read_header, read_tensor, save_state_dict
from btm.train_config import TrainConfig

CHECKPOINT = "checkpoint"
OPTIMIZER_FILE = OPTIMIZER
STATE_FILE = "state.json"


def optimizer_state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments keyed by parameter name, so they can be saved as safetensors (no
    pickle) and averaged like weights."""
    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if not st:
            continue
        for k, v in st.items():
            out[f"{name}::{k}"] = v.detach().reshape(v.shape).to("cpu", torch.float32).contiguous()
    return out


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> int:
    """Load moments saved by optimizer_state_tensors; returns how many parameters matched."""
    infos = read_header(path).tensors
    n = 0
    for name, p in model.named_parameters():
        keys = [k for k in infos if k.startswith(name + "::")]
        if not keys:
            continue
        st = opt.state[p]
        for k in keys:
            t = read_tensor(path, infos[k])
            what = k.split("::", 1)[1]
            if what == "step":
                st[what] = t.to(torch.float32).reshape(()).to(p.device if opt.defaults.get("fused") else "cpu")
            else:
                if tuple(t.shape) != tuple(p.shape):
                    raise BTMError(
                        f"{path}: optimizer state {k} has shape {tuple(t.shape)}, "
                        f"the parameter has {tuple(p.shape)}"
                    )
                st[what] = t.to(p.device, p.dtype)
        n += 1
    return n


def save_checkpoint(run_dir: Path, model, opt, cfg: TrainConfig, step: int, extra: dict) -> None:
    """Atomically replace run_dir/checkpoint with the state after `step` local steps."""
    from btm.family import _dedup_tied

    ck = run_dir / CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state_dict(_dedup_tied(model.state_dict()), tmp)
    save_state_dict(optimizer_state_tensors(model, opt), tmp / "opt")
    os.replace(tmp / "opt" / WEIGHTS_FILE, tmp / OPTIMIZER_FILE)
    (tmp / "opt").rmdir()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_state_dict(rng, tmp / "rng")
    os.replace(tmp / "rng" / WEIGHTS_FILE, tmp / "rng.safetensors")
    (tmp / "rng").rmdir()
    state = {"step": step, "global_step": cfg.schedule_start + step, "config": asdict(cfg), **extra}
    atomic.write_text(tmp / STATE_FILE, json.dumps(state, indent=1))
    old = run_dir / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ck.exists():
        os.replace(ck, old)
    os.replace(tmp, ck)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_state(run_dir: Path) -> dict | None:
    f = run_dir / CHECKPOINT / STATE_FILE
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise BTMError(f"{f}: corrupted checkpoint state; delete {f.parent} to start over") from None


def checkpoint_optimizer(model_dir: str | os.PathLike) -> Path | None:
    """The optimizer state saved with a trained model, if any (to carry into branches)."""
    p = Path(model_dir) / CHECKPOINT / OPTIMIZER_FILE
    if p.exists():
        return p
    p = Path(model_dir) / OPTIMIZER_FILE
    return p if p.exists() else None
