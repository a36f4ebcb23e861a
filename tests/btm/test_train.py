"""The training loop: exact resume after a crash, DDP equivalence, schedule, optimizer carry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from btm.safetensors_io import iter_tensors, open_weights
from btm.train import TrainConfig

SCRIPT = Path(__file__).resolve().parents[1] / "train_script.py"


def weights(d: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(open_weights(d)))


def run(args, env=None, check=True):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=e, capture_output=True, text=True,
                          check=False, timeout=300) if not check else _checked(args, e)


def _checked(args, env):
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_killed_run_resumes_to_the_same_parameters(tmp_path, tokenizer_dir, cache_dir):
    run([tokenizer_dir, tmp_path / "full", 10, "--cache", cache_dir])
    r = run([tokenizer_dir, tmp_path / "crash", 10, "--kill-after", 7, "--cache", cache_dir], check=False)
    assert r.returncode == -9  # really killed with SIGKILL
    assert not (tmp_path / "crash" / "model.safetensors").exists()  # no half-finished ELM
    assert (tmp_path / "crash" / "checkpoint" / "state.json").exists()  # a checkpoint at step 6
    run([tokenizer_dir, tmp_path / "crash", 10, "--cache", cache_dir])
    a, b = weights(tmp_path / "full"), weights(tmp_path / "crash")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_ddp_matches_single_process(tmp_path, tokenizer_dir, cache_dir):
    run([tokenizer_dir, tmp_path / "single", 6, "--batch", 8, "--cache", cache_dir, "--checkpoint-every", 0])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
         str(SCRIPT), str(tokenizer_dir), str(tmp_path / "ddp"), "6", "--batch", "8", "--micro", "2",
         "--cache", str(cache_dir), "--checkpoint-every", "0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the same losses step by step (the all-reduced mean equals the single-process mean) ...
    la = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 6 and la[0] != la[-1]
    assert la == pytest.approx(lb, abs=1e-5)
    # ... and the same weights up to float summation order (Adam amplifies the last bits of
    # near-zero gradients, so a few elements differ by ~1e-5)
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


def test_lr_schedule_warmup_and_decay_and_continuation():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    # the second half of a 100-step schedule continues where the first half stopped
    first = TrainConfig(steps=50, lr=1.0, warmup=0.1, schedule_steps=100)
    second = TrainConfig(steps=50, lr=1.0, warmup=0.1, schedule_start=50, schedule_steps=100)
    assert [first.lr_at(s) for s in range(50)] + [second.lr_at(50 + s) for s in range(50)] == lrs


def test_seed_then_continue_equals_one_run(tmp_path, tok, cache_dir):
    """The compute-matched accounting: a seed that is the first half of a dense run, continued
    on the same mixture with its optimizer state, is exactly that dense run."""
    from helpers import TRAIN_DOMAINS, streams, tiny_train_config

    from btm.data import BlockSampler
    from btm.family import Card, load_model, new_model, preset_config
    from btm.train import checkpoint_optimizer, train

    torch.set_num_threads(1)
    sampler = BlockSampler(streams(tok, cache_dir, TRAIN_DOMAINS), 64)
    train(new_model(preset_config("tiny", tok)), tok, sampler, tiny_train_config(8), tmp_path / "dense",
          Card(name="dense", kind="dense"))
    train(new_model(preset_config("tiny", tok)), tok, sampler, tiny_train_config(4, schedule_steps=8),
          tmp_path / "half", Card(name="half", kind="seed"))
    train(load_model(tmp_path / "half"), tok, sampler, tiny_train_config(4, schedule_start=4, schedule_steps=8),
          tmp_path / "rest", Card(name="rest", kind="dense"), init_optimizer=checkpoint_optimizer(tmp_path / "half"))
    a, b = weights(tmp_path / "dense"), weights(tmp_path / "rest")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_changed_settings_refuse_to_resume(tmp_path, tok, cache_dir):
    from helpers import streams, tiny_train_config

    from btm.data import BlockSampler
    from btm.errors import BTMError
    from btm.family import Card, new_model, preset_config
    from btm.train import train

    sampler = BlockSampler(streams(tok, cache_dir, ["go"]), 64)
    train(new_model(preset_config("tiny", tok)), tok, sampler, tiny_train_config(2), tmp_path / "x", Card(name="x"))
    with pytest.raises(BTMError, match="different settings.*lr"):
        train(new_model(preset_config("tiny", tok)), tok, sampler, tiny_train_config(2, lr=1e-4), tmp_path / "x",
              Card(name="x"))
