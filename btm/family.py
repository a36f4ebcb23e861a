"""Model families, presets and ELM directories.

A family is an architecture config (weight tying included), a tokenizer and a tensor layout:
every ELM of a forest belongs to the seed's family, which is what makes parameter averaging
and ensembling well-defined. One function, family_differences, decides it. An ELM
is saved as a plain Hugging Face model directory (config.json, model.safetensors or shards
with an index, tokenizer files) plus a model card (README.md). The card's facts (domain,
parents with weights, data, metrics) also travel in the safetensors metadata, so they stay
with the weights wherever the file goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as hf_logging

from btm import atomic
from btm.errors import FamilyError
from btm.model_files import CARD, CONFIG, TOKENIZER_FILES, WEIGHTS_GLOB, is_aux_file
from btm.safetensors_io import DTYPE_NAMES, DTYPES, open_weights, save_state_dict
from btm.tokenizer import bos_id, load_tokenizer, tokenizer_sha256

hf_logging.disable_progress_bar()  # one bar per loaded ELM drowns the output of forest-wide work

# Presets: an architecture (a transformers model_type) and its shape. The only place that names
# architectures; everything else goes through AutoConfig / AutoModelForCausalLM. Dropout is off:
# these runs are short and data-rich, and it keeps training bit-for-bit reproducible on resume.
PRESETS: dict[str, tuple[str, dict[str, int | bool]]] = {
    # Llama architecture (RoPE, SwiGLU, RMSNorm, grouped-query attention), as open LMs are today;
    # the MLP is 8/3 as wide as the model (rounded up to 32), so it holds as many weights as
    # GPT-2's 4x one. Untied embeddings, as Llama 2 and Mistral: the families with a native
    # mixture-of-experts form (Mixtral) expect it.
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)),  # tests
    "mini": ("llama", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)),  # the demo
    "small": ("llama", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)),  # CPU runs
    "base": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                           num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)),
    "125m": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)),  # GPUs
    # GPT-2 (learned positions, GELU MLP, LayerNorm, tied embeddings): no mixture-of-experts form
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=2, n_embd=64, n_positions=256)),
    "gpt2-mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=128, n_positions=256)),
    "gpt2-small": ("gpt2", dict(n_layer=4, n_head=4, n_embd=256, n_positions=512)),
    "gpt2-base": ("gpt2", dict(n_layer=6, n_head=8, n_embd=512, n_positions=1024)),
    "gpt2-125m": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)),
    # other families, tiny (tests, examples)
    "qwen2-tiny": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "gpt-neox-tiny": ("gpt_neox", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256)),
    "opt-tiny": ("opt", dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=64)),
}

# Config keys that do not change the architecture (and so may differ within a family). Weight
# tying is not one of them: an untied model has a tensor (the output embedding) a tied one lacks.
NON_ARCH_KEYS = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "architectures",
    "bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id", "task_specific_params",
    "_attn_implementation_autoset", "attn_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "embd_pdrop", "resid_pdrop",
    "attn_pdrop", "summary_first_dropout", "elmforest",
}

# The config facts a user recognises, in the order a mismatch names them. Generic names:
# transformers' attribute_map reads them for every model_type (n_embd for gpt2's hidden_size).
HEADLINE_KEYS = ("model_type", "tie_word_embeddings", "vocab_size", "hidden_size", "num_hidden_layers")


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


# --------------------------------------------------------------------------- the family check

Signature = Mapping[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


@dataclass(frozen=True)
class Family:
    """What decides whether two models' weights can be mixed. A part that is None is not known
    (a declared upload has no weights yet, a bare weights file no tokenizer) and not compared."""

    config: PretrainedConfig | None = None
    tokenizer: str | None = None  # tokenizer_sha256
    tensors: Signature | None = None  # from the safetensors headers; no tensor is read


_tokenizer_ids: dict[str, str] = {}  # hash of the tokenizer files -> tokenizer_sha256


def _tokenizer_id(model_dir: Path) -> str:
    """tokenizer_sha256 of a directory's tokenizer, loaded once per distinct set of files: the
    ELMs of a forest carry copies of one tokenizer, and loading a large one takes seconds."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = model_dir / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
    key = h.hexdigest()
    if key not in _tokenizer_ids:
        _tokenizer_ids[key] = tokenizer_sha256(load_tokenizer(model_dir))
    return _tokenizer_ids[key]


def family_of(model_dir: str | os.PathLike) -> Family:
    """A model directory's family: its config, tokenizer and safetensors headers."""
    d = Path(model_dir)
    return Family(load_config(d), _tokenizer_id(d), open_weights(d).signature())


def _few(names: list[str], k: int = 3) -> str:
    return f"{names[:k]}" + (f" and {len(names) - k} more" if len(names) > k else "")


def _config_differences(a: PretrainedConfig, b: PretrainedConfig) -> tuple[list[str], list[str]]:
    """(headline differences, other differing architecture keys), each as 'key: a vs b'."""
    head, named = [], set()
    for key in HEADLINE_KEYS:
        ka, kb = a.attribute_map.get(key, key), b.attribute_map.get(key, key)
        named |= {key, ka, kb}
        va, vb = getattr(a, key, None), getattr(b, key, None)
        if va != vb:
            head.append(f"{ka if ka == kb else key}: {va!r} vs {vb!r}")  # the config.json name where they agree
    da, db = architecture(a), architecture(b)
    rest = [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in sorted(set(da) | set(db))
            if k not in named and da.get(k) != db.get(k)]
    return head, rest


def _dtype_kind(dtype: str) -> str:
    # Floating precision is how weights are stored, not what they are: averaging reads each
    # input in its own dtype and accumulates in fp32 (a bf16 Hub seed, fp32 trained ELMs).
    t = DTYPES.get(dtype)
    return "float" if t is not None and t.is_floating_point else dtype


def _tensor_differences(a: Signature, b: Signature) -> list[str]:
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    names = ([f"missing {_few(missing)}"] if missing else []) + ([f"extra {_few(extra)}"] if extra else [])
    out = [f"tensor names differ: {', '.join(names)}"] if names else []
    common = [n for n in b if n in a]
    shapes = [f"{n!r} has shape {list(a[n][1])} vs {list(b[n][1])}" for n in common
              if tuple(a[n][1]) != tuple(b[n][1])]
    kinds = [f"{n!r} is {a[n][0]} vs {b[n][0]}" for n in common if _dtype_kind(a[n][0]) != _dtype_kind(b[n][0])]
    for what in (shapes, kinds):
        if what:
            out.append("tensor " + ", ".join(what[:3]) + (f" ({len(what)} tensors in all)" if len(what) > 3 else ""))
    return out


def family_differences(a: Family, b: Family) -> list[str]:
    """Why a and b are not one family, what a user recognises first (model_type, tying, sizes,
    then the tokenizer, other config keys, tensors); empty when they are one. The one decision
    of whether weights can be mixed: forest add, branch, average, eval and the coordinator's
    validation of an upload all come here."""
    head: list[str] = []
    rest: list[str] = []
    if a.config is not None and b.config is not None:
        head, rest = _config_differences(a.config, b.config)
    if a.tokenizer and b.tokenizer and a.tokenizer != b.tokenizer:
        head.append(f"tokenizer: sha256 {a.tokenizer[:12]} vs {b.tokenizer[:12]}")
    if rest:
        head.append("other config keys: " + ", ".join(rest[:6]) + (f" and {len(rest) - 6} more" if len(rest) > 6 else ""))
    if a.tensors is not None and b.tensors is not None:
        head += _tensor_differences(a.tensors, b.tensors)
    return head


def check_family(a: Family | str | os.PathLike, b: Family | str | os.PathLike, what_a: str, what_b: str) -> None:
    """Raise FamilyError naming both models and their differences unless a and b (families or
    model directories) are one family."""
    diffs = family_differences(a if isinstance(a, Family) else family_of(a),
                               b if isinstance(b, Family) else family_of(b))
    if diffs:
        raise FamilyError(f"{what_a} and {what_b} are of different model families: {'; '.join(diffs)}. "
                          "Their weights cannot be averaged; every ELM of a forest must descend from its seed")


def new_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


# Loading a model with transformers is not thread-safe (from_pretrained patches torch's module
# initialisation for the whole process while it builds a model), and several threads of one
# process load models: the ClientApps of in-process Flower nodes (coordinator.federated.local),
# each training or scoring. load_model holds this lock, so every caller gets it.
_LOADING = threading.Lock()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32):
    path = Path(path)
    if not (path / CONFIG).exists():
        raise FamilyError(f"{path}: no config.json; not a model directory")
    open_weights(path)  # clear error for missing/corrupt weights before transformers tries
    with _LOADING:
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
    if not (path / CONFIG).exists():
        raise FamilyError(f"{path}: no config.json; not a model directory")
    return AutoConfig.from_pretrained(str(path))


# --------------------------------------------------------------------------- model cards


@dataclass
class Card:
    """What an ELM is and where it came from; written to README.md and safetensors metadata."""

    name: str
    kind: str = "elm"  # seed | elm | branch-init | average | dense | moe | external (no card: see read_card)
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
        title = KIND_TITLES.get(self.kind, "Expert LM (ELM)")
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
        lines += _section("Source", self._source_lines())
        parents = [(p["name"], f"{p['weight']:.4f}") for p in self.parents]
        lines += _section("Parents", _table(("parent", "weight"), parents))
        lines += _section("Data", _bullets(self.data))
        lines += _section("Training", _bullets(self.training))
        lines += _section("Metrics", _table(("metric", "value"), [(k, metric_text(v)) for k, v in self.metrics.items()]))
        lines += _section("Reproduce", ["```", self.recipe, "```", ""] if self.recipe else [])
        return "\n".join(lines + USE_SECTION)

    def _source_lines(self) -> list[str]:
        """Where an imported model came from: its Hub id and commit, and the sha256 of each file."""
        if not self.source:
            return []
        requested = f" (asked for `{self.source['requested']}`)" if self.source.get("requested") else ""
        files = sorted((self.source.get("files") or {}).items())
        return [f"Imported from the Hugging Face Hub: `{self.source.get('hub')}` at commit "
                f"`{self.source.get('revision')}`{requested}.", "",
                *_table(("file", "sha256"), [(n, f"`{h}`") for n, h in files])]


KIND_TITLES = {"seed": "Seed LM", "average": "Averaged model", "dense": "Dense baseline",
               "moe": "Mixture-of-experts model"}  # any other kind is an ELM
USE_SECTION = [
    "## Use",
    "",
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
    'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
    "```",
    "",
]


def metric_text(v: Any, places: int = 4) -> str:
    """A metric as cards show it: a float to `places` decimals, anything else as it is."""
    return f"{v:.{places}f}" if isinstance(v, float) else f"{v}"


def _section(title: str, body: list[str]) -> list[str]:
    """A card's section, or nothing where it has nothing to say."""
    return [f"## {title}", "", *body] if body else []


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    """A two-column table and the blank line after it; nothing for no rows."""
    if not rows:
        return []
    return [f"| {header[0]} | {header[1]} |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows), ""]


def _bullets(d: dict[str, Any]) -> list[str]:
    return [*(f"- {k}: {v}" for k, v in d.items()), ""] if d else []


def read_card(path: str | os.PathLike) -> Card:
    """The card of a model directory: its README's front matter, else the weights' metadata
    (a copied init keeps its parent's weights and metadata but has a README of its own)."""
    readme = Path(path) / CARD
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
    """Write a loadable HF directory: config, weights, tokenizer and card. The old card is
    removed first and the new one written last; the config, the weights and the card go to a
    temp name and are renamed (the tokenizer's files are written in place by save_pretrained),
    so a crash never leaves a directory that looks done."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD).unlink(missing_ok=True)
    config = model.config
    card.family = family_id(config, tokenizer)
    state = _dedup_tied(model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    cfg = config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic.write_text(out / CONFIG, json.dumps(cfg, indent=2, sort_keys=True))
    for old in out.glob(WEIGHTS_GLOB):
        old.unlink()
    save_state_dict(state, out, {"elmforest": card.to_json()}, max_shard_bytes)
    tokenizer.save_pretrained(str(out))
    atomic.write_text(out / CARD, card.markdown())
    return out


def write_card(out_dir: str | os.PathLike, card: Card) -> None:
    atomic.write_text(Path(out_dir) / CARD, card.markdown())


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """config and tokenizer files of src into dst (for models whose weights we write)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and is_aux_file(f.name):
            atomic.copy_file(f, dst / f.name)


def load_family(path: str | os.PathLike):
    """(config, tokenizer) of a model directory."""
    return load_config(path), load_tokenizer(path)


def weights_dtype(path: str | os.PathLike) -> str:
    idx = open_weights(path)
    return idx.info(idx.names[0]).dtype


__all__ = [
    "PRESETS", "Card", "DTYPE_NAMES", "Family", "architecture", "check_family", "copy_aux_files",
    "family_differences", "family_id", "family_of", "load_config", "load_family", "load_model", "new_model",
    "preset_config", "read_card", "save_elm", "weights_dtype", "write_card",
]
