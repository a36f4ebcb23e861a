"""Train the tiny model from a test: single process or under torchrun, optionally killing
itself with SIGKILL after a given step (to test resume after a real crash).

usage: python train_script.py TOKENIZER_DIR OUT STEPS [--kill-after N] [--batch B] [--micro M]
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from helpers import TRAIN_DOMAINS, streams, tiny_train_config  # noqa: E402

from btm.data import BlockSampler  # noqa: E402
from btm.family import Card, new_model, preset_config  # noqa: E402
from btm.tokenizer import load_tokenizer  # noqa: E402
from btm.train import train  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("tokenizer")
p.add_argument("out")
p.add_argument("steps", type=int)
p.add_argument("--kill-after", type=int, default=0)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--micro", type=int, default=None)
p.add_argument("--checkpoint-every", type=int, default=3)
p.add_argument("--cache", default=None)
a = p.parse_args()

torch.set_num_threads(1)
tok = load_tokenizer(a.tokenizer)
model = new_model(preset_config("tiny", tok), seed=0)


def on_step(step, rec):
    if a.kill_after and step == a.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


cfg = tiny_train_config(a.steps, batch_size=a.batch, micro_batch_size=a.micro, checkpoint_every=a.checkpoint_every,
                        log_every=1)
train(model, tok, BlockSampler(streams(tok, a.cache, TRAIN_DOMAINS), 64), cfg, a.out, Card(name="t", kind="seed"),
      on_step=on_step)
