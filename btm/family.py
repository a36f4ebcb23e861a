"""Model families, presets and ELM directories.

A family is an architecture config plus a tokenizer: every ELM of a forest belongs to the
seed's family, which is what makes parameter averaging and ensembling well-defined. An ELM
is saved as a plain Hugging Face model directory (config.json, model.safetensors or shards
with an index, tokenizer files) plus a model card (README.md). The card's facts (domain,
parents with weights, data, metrics) also travel in the safetensors metadata, so they stay
with the weights wherever the file goes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as hf_logging

from btm.errors import FamilyError
from btm.safetensors_io import DTYPE_NAMES, atomic_write_text, open_weights, save_state_dict
from btm.tokenizer import bos_id, load_tokenizer, tokenizer_sha256

hf_logging.disable_progress_bar()  # one bar per loaded ELM drowns the output of forest-wide work

# Presets: an architecture (a transformers model_type) and its shape. The only place that names
# architectures; everything else goes through AutoConfig / AutoModelForCausalLM. Dropout is off:
# these runs are short and data-rich, and it keeps training bit-for-bit reproducible on resume.
PRESETS: dict[str, tuple[str, dict[str, int | bool]]] = {
    "tiny": ("gpt2", dict(n_layer=2, n_head=2, n_embd=64, n_positions=256)),  # tests
    "mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=128, n_positions=256)),  # the demo: minutes on a laptop CPU
    "small": ("gpt2", dict(n_layer=4, n_head=4, n_embd=256, n_positions=512)),  # CPU runs
    "base": ("gpt2", dict(n_layer=6, n_head=8, n_embd=512, n_positions=1024)),  # a bigger CPU/GPU run
    "gpt2-125m": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)),  # GPUs
    # other families, tiny (tests, examples)
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)),
    "qwen2-tiny": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "gpt-neox-tiny": ("gpt_neox", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256)),
    "opt-tiny": ("opt", dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=64)),
}

# Config keys that do not change the architecture (and so may differ within a family).
NON_ARCH_KEYS = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "architectures",
    "bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id", "task_specific_params",
    "_attn_implementation_autoset", "attn_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "tie_word_embeddings", "embd_pdrop", "resid_pdrop",
    "attn_pdrop", "summary_first_dropout", "elmforest",
}


def preset_config(preset: str, tokenizer) -> PretrainedConfig:
    if preset not in PRESETS:
        raise FamilyError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    model_type, shape = PRESETS[preset]
    b = bos_id(tokenizer)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=b, eos_token_id=b,
                                  pad_token_id=b, **shape)
    for key, value in config.to_dict().items():  # every dropout of the family off
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    return config


def architecture(config: PretrainedConfig) -> dict[str, Any]:
    d = config.to_dict()
    return {k: v for k, v in sorted(d.items()) if k not in NON_ARCH_KEYS and not k.startswith("_")}


def family_id(config: PretrainedConfig, tokenizer) -> str:
    """Short stable id of (architecture, tokenizer); equal ids mean one family."""
    blob = json.dumps({"arch": architecture(config), "tok": tokenizer_sha256(tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_same_family(a: PretrainedConfig, b: PretrainedConfig, what_a: str, what_b: str) -> None:
    da, db = architecture(a), architecture(b)
    if da != db:
        diffs = [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
        raise FamilyError(
            f"{what_a} and {what_b} are of different model families ({'; '.join(diffs[:6])}); "
            "every ELM of a forest must descend from the same seed"
        )


def new_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32):
    path = Path(path)
    if not (path / "config.json").exists():
        raise FamilyError(f"{path}: no config.json; not a model directory")
    open_weights(path)  # clear error for missing/corrupt weights before transformers tries
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Copy a model directory's weights into an existing model of the same family, tensor by
    tensor (no new model is built: scoring n ELMs in turn reuses one)."""
    from btm.errors import WeightsError
    from btm.safetensors_io import iter_tensors

    sd = model.state_dict()
    with torch.no_grad():
        for name, t in iter_tensors(open_weights(path)):
            if name not in sd or sd[name].shape != t.shape:
                raise WeightsError(f"{path}: tensor {name!r} does not fit this model; not the same family")
            sd[name].copy_(t)
    model.tie_weights()
    return model


def reuse_or_load(shell: torch.nn.Module | None, path: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """`path`'s model, in `shell` when it has the same architecture (no new model is built),
    else freshly loaded."""
    if shell is not None and architecture(load_config(path)) == architecture(shell.config):
        return load_weights_into(shell, path)
    return load_model(path, device)


def load_config(path: str | os.PathLike) -> PretrainedConfig:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FamilyError(f"{path}: no config.json; not a model directory")
    return AutoConfig.from_pretrained(str(path))


# --------------------------------------------------------------------------- model cards


@dataclass
class Card:
    """What an ELM is and where it came from; written to README.md and safetensors metadata."""

    name: str
    kind: str = "elm"  # seed | elm | branch-init | average | dense
    domain: str | None = None
    parents: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "weight", "sha256"?}]
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    family: str | None = None
    # where an init came from (e.g. a coordinator's forest, version and branch init); carried
    # from an init to the ELM trained from it, so submitting needs no extra bookkeeping
    origin: dict[str, Any] = field(default_factory=dict)
    # where an imported model came from: {"hub": "org/name", "revision": commit, "requested", "files": {name: sha256}}
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Card:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def markdown(self) -> str:
        title = {"seed": "Seed LM", "average": "Averaged model", "dense": "Dense baseline"}.get(
            self.kind, "Expert LM (ELM)"
        )
        lines = [
            "---",
            "library_name: transformers",
            "tags: [elmforest, branch-train-merge]",
            f"elmforest: {self.to_json()}",
            "---",
            "",
            f"# {self.name}: {title}" + (f" for domain `{self.domain}`" if self.domain else ""),
            "",
            "Part of an elmforest forest grown by Branch-Train-Merge: an expert language model "
            "descending from the forest's seed LM.",
            "",
        ]
        if self.source:
            lines += ["## Source", "", f"Imported from the Hugging Face Hub: `{self.source.get('hub')}` at commit "
                      f"`{self.source.get('revision')}`" + (f" (asked for `{self.source['requested']}`)"
                                                             if self.source.get("requested") else "") + ".", ""]
            if self.source.get("files"):
                lines += ["| file | sha256 |", "| --- | --- |"]
                lines += [f"| {n} | `{h}` |" for n, h in sorted(self.source["files"].items())] + [""]
        if self.parents:
            lines += ["## Parents", "", "| parent | weight |", "| --- | --- |"]
            lines += [f"| {p['name']} | {p['weight']:.4f} |" for p in self.parents]
            lines.append("")
        if self.data:
            lines += ["## Data", ""] + [f"- {k}: {v}" for k, v in self.data.items()] + [""]
        if self.training:
            lines += ["## Training", ""] + [f"- {k}: {v}" for k, v in self.training.items()] + [""]
        if self.metrics:
            lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
            lines += [
                f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                for k, v in self.metrics.items()
            ]
            lines.append("")
        if self.recipe:
            lines += ["## Reproduce", "", "```", self.recipe, "```", ""]
        lines += [
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            "```",
            "",
        ]
        return "\n".join(lines)


def read_card(path: str | os.PathLike) -> Card:
    """The card of a model directory: its README's front matter, else the weights' metadata
    (a copied init keeps its parent's weights and metadata but has a README of its own)."""
    readme = Path(path) / "README.md"
    if readme.exists():
        for line in readme.read_text(errors="replace").splitlines()[:10]:
            if line.startswith("elmforest: "):
                try:
                    return Card.from_dict(json.loads(line[len("elmforest: "):]))
                except (json.JSONDecodeError, TypeError):
                    break
    meta = open_weights(path).metadata
    if "elmforest" in meta:
        return Card.from_dict(json.loads(meta["elmforest"]))
    return Card(name=Path(path).name, kind="external")


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied embeddings), as HF does."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = t
    return out


def save_elm(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    card: Card,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a loadable HF directory. Each file is written to a temp name and renamed, and
    the README (the card) goes last, so a crash never leaves a directory that looks done."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").unlink(missing_ok=True)
    config = model.config
    card.family = family_id(config, tokenizer)
    state = _dedup_tied(model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    cfg = config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    save_state_dict(state, out, {"elmforest": card.to_json()}, max_shard_bytes)
    tokenizer.save_pretrained(str(out))
    atomic_write_text(out / "README.md", card.markdown())
    return out


def write_card(out_dir: str | os.PathLike, card: Card) -> None:
    atomic_write_text(Path(out_dir) / "README.md", card.markdown())


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """config and tokenizer files of src into dst (for models whose weights we write)."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and (f.name == "config.json" or f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config"))):
            shutil.copyfile(f, dst / (f.name + ".tmp"))
            os.replace(dst / (f.name + ".tmp"), dst / f.name)


def load_family(path: str | os.PathLike):
    """(config, tokenizer) of a model directory."""
    return load_config(path), load_tokenizer(path)


def weights_dtype(path: str | os.PathLike) -> str:
    idx = open_weights(path)
    return idx.info(idx.names[0]).dtype


__all__ = [
    "PRESETS", "Card", "DTYPE_NAMES", "architecture", "check_same_family", "copy_aux_files",
    "family_id", "load_config", "load_family", "load_model", "new_model", "preset_config",
    "read_card", "save_elm", "weights_dtype", "write_card",
]
