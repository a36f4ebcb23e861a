"""Helpers shared by tests: where the test corpus is, tiny training settings."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "btm" / "demo_corpus"
TRAIN_DOMAINS = ["python", "kjv_bible", "postgres_docs", "webster_dictionary"]


def tiny_train_config(steps: int, **kw):
    from btm.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=kw.pop("batch_size", 8), block_size=kw.pop("block_size", 64),
                       lr=kw.pop("lr", 3e-3), progress=False, log_every=kw.pop("log_every", 5), **kw)


def streams(tok, cache_dir, domains):
    from btm.data import Corpus, tokenize_file

    c = Corpus(CORPUS)
    return [tokenize_file(c[d].split_path("train"), tok, cache_dir) for d in domains]


def elmforest(*args, cwd, check=True):
    """Run the command in-process (imports are paid once), in `cwd`."""
    import os

    from typer.testing import CliRunner

    from elmforest_cli import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    if check:
        assert r.exit_code == 0, f"elmforest {' '.join(map(str, args))}\n{r.output}\n{r.exception!r}"
    return r


# A Python in which elmforest is not installed: importing btm fails (prepended to `python -c` code)
NO_BTM = """
import sys
class _NoBtm:
    def find_spec(self, name, path=None, target=None):
        if name == "btm" or name.startswith("btm."):
            raise ImportError("No module named 'btm' (elmforest is not installed here)")
sys.meta_path.insert(0, _NoBtm())
try:
    import btm
    raise SystemExit("btm is importable: the test proves nothing")
except ImportError:
    pass
"""


def run_without_btm(code: str, *args, cwd=None, timeout=300):
    """Run NO_BTM + code in a fresh interpreter (offline), arguments as strings; it must succeed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", NO_BTM + code, *map(str, args)], capture_output=True, text=True,
                       cwd=cwd or "/", env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r
