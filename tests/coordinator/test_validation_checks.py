"""Each validation check on its own: it passes a good ELM and refuses the one defect it is
for, saying what is wrong in the contributor's terms. (The whole pipeline, hostile files
through the API included, is in test_untrusted_uploads.py.)"""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from btm.safetensors_io import open_weights, save_state_dict
from coordinator.models import Contribution, Forest
from coordinator.services.contributions import CHECKS, Candidate, Refused

CONFIG = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
          "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0}
LABEL = "model.safetensors of contribution 1"


def check(name: str):
    return dict(CHECKS)[name]


@pytest.fixture(scope="module")
def init_state():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG))
    return {n: t.detach().clone().contiguous() for n, t in model.state_dict().items() if "attn.bias" not in n
            and n != "lm_head.weight"}


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, init_state):
    d = tmp_path_factory.mktemp("init")
    save_state_dict(init_state, d)
    return d


def candidate(tmp_path, init_dir, state=None, raw: bytes | None = None, config=None, holder=None, declared=None):
    """A Candidate for weights `state` (or the file bytes `raw`), as validate() builds one."""
    d = tmp_path / "upload"
    if raw is None:
        save_state_dict(state, d)
        path = d / "model.safetensors"
    else:
        d.mkdir(parents=True)
        path = d / "model.safetensors"
        path.write_bytes(raw)
    data = path.read_bytes()
    size, sha = declared or (len(data), hashlib.sha256(data).hexdigest())
    c = Contribution(id=1, weights_size=size, weights_sha256=sha, config=config or CONFIG,
                     forest=Forest(name="ff", config=CONFIG))
    return Candidate(c, path, LABEL, open_weights(init_dir).signature(), init_dir, holder or (lambda sha: None))


def trained(init_state):
    return {n: t + 0.01 for n, t in init_state.items()}


def run_upto(x: Candidate, name: str) -> None:
    """The checks before `name` (a later check relies on what earlier ones set, e.g. the header)."""
    for n, fn in CHECKS:
        if n == name:
            return
        fn(x)


@pytest.mark.parametrize("name", [n for n, _ in CHECKS])
def test_a_trained_elm_passes_every_check(name, tmp_path, init_dir, init_state):
    x = candidate(tmp_path, init_dir, trained(init_state))
    run_upto(x, name)
    check(name)(x)


def refused(x: Candidate, name: str) -> str:
    run_upto(x, name)
    with pytest.raises(Refused) as e:
        check(name)(x)
    return str(e.value)


def test_declared_size_and_hash(tmp_path, init_dir, init_state):
    x = candidate(tmp_path, init_dir, trained(init_state), declared=(10, "0" * 64))
    assert refused(x, "size and sha256 as declared").endswith("bytes; 10 were declared")
    data = x.path.read_bytes()
    x.c.weights_size = len(data)
    assert "sha256 differs from the declared one" in refused(x, "size and sha256 as declared")


def test_not_a_copy(tmp_path, init_dir, init_state):
    x = candidate(tmp_path, init_dir, trained(init_state), holder=lambda sha: "ELM python (contribution 3, merged)")
    msg = refused(x, "not a copy of a file the coordinator holds")
    assert "byte for byte the same file as ELM python (contribution 3, merged)" in msg


def test_safetensors_read_one_way(tmp_path, init_dir, init_state):
    name = "a safetensors file the reference library reads one way"
    save_state_dict(trained(init_state), tmp_path / "good")
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    msg = refused(candidate(tmp_path / "a", init_dir, raw=data + b"\0" * 8), name)  # bytes after the last tensor
    assert LABEL in msg and str(tmp_path) not in msg  # the contributor's file, never a server path
    n = struct.unpack("<Q", data[:8])[0]
    pickled = b"\x80\x02" + data[8 + n:]  # what torch.save writes starts so: not a safetensors header
    msg = refused(candidate(tmp_path / "b", init_dir, raw=pickled), name)
    assert LABEL in msg and str(tmp_path) not in msg


def test_layout_of_the_family(tmp_path, init_dir, init_state):
    name = "tensor names, shapes and dtypes of the forest's family"
    state = trained(init_state)
    state["transformer.extra.weight"] = torch.zeros(2)
    assert "is not of the forest's family" in refused(candidate(tmp_path / "a", init_dir, state), name)
    half = {n: t.half() for n, t in trained(init_state).items()}
    assert "tensor 'transformer.wte.weight' is F16, the forest's family uses F32" in refused(
        candidate(tmp_path / "b", init_dir, half), name)


def test_config_of_the_family(tmp_path, init_dir, init_state):
    x = candidate(tmp_path, init_dir, trained(init_state), config={**CONFIG, "n_layer": 2})
    assert "the config is not of the forest's family" in refused(x, "config of the forest's family")


def test_finite(tmp_path, init_dir, init_state):
    state = trained(init_state)
    first = next(iter(state))
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("nan")
    msg = refused(candidate(tmp_path, init_dir, state), "no NaN or Inf")
    assert f"tensor {first!r} contains NaN or Inf values" in msg


def test_differs_from_its_starting_point(tmp_path, init_dir, init_state):
    x = candidate(tmp_path, init_dir, dict(init_state))
    x.init_name = "its branch init"
    msg = refused(x, "differs from its starting point (branch init, or the seed for an import)")
    assert msg == "the weights are identical to its branch init: train the ELM on its domain before submitting"
