"""A forest as one native mixture-of-experts model (as BTX, FlexOlmo and mergekit-moe build
them), which plain transformers and serving engines load with no code of ours:

    each layer's MLP of ELM j      -> expert j of that layer, bit for bit
    every other tensor             -> the weighted average of the ELMs (uniform, a target's
                                      posterior, or the seed's own), streamed by btm.average
    router row (layer i, ELM j)    -> the mean hidden state entering layer i's MLP over ELM j's
                                      domain sample, under that averaged backbone, centred over
                                      the ELMs and of unit length

A token then runs k MLPs instead of k whole models. Llama and Mistral forests become Mixtral,
Qwen2 forests Qwen2-MoE (with a zero-width shared expert); tensors carry the names vLLM's
loaders read for those architectures. Other families have no MoE form and are refused.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from btm.errors import DataError, FamilyError
from btm.forest import Forest

MLP_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
ROUTER_BLOCKS = 32  # blocks of each ELM's domain sample behind its router rows
# config keys a dense model and its MoE form share
SHARED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "initializer_range",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
)


@dataclass(frozen=True)
class MoeForm:
    """How one dense family is written as an MoE: its model type, config and tensor names."""

    model_type: str
    config: Callable  # (dense config dict, n experts, k per token) -> PretrainedConfig
    expert: Callable[[int, int, str], str]  # (layer, expert, gate|up|down) -> tensor name
    router: Callable[[int], str]  # layer -> the router's tensor name
    extra: Callable[[int, int], dict[str, tuple[int, ...]]]  # (layer, hidden) -> zero tensors to add


def _mixtral_config(d: dict, n: int, k: int):
    from transformers import MixtralConfig

    return MixtralConfig(**_shared(d), intermediate_size=d["intermediate_size"], num_local_experts=n,
                         num_experts_per_tok=k, output_router_logits=False)


def _qwen2_moe_config(d: dict, n: int, k: int):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_shared(d), intermediate_size=d["intermediate_size"],
                          moe_intermediate_size=d["intermediate_size"], shared_expert_intermediate_size=0,
                          num_experts=n, num_experts_per_tok=k, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], output_router_logits=False)


def _shared(d: dict) -> dict:
    return {k: d[k] for k in SHARED_KEYS if k in d}


MIXTRAL_PROJ = {"gate": "w1", "down": "w2", "up": "w3"}
MIXTRAL = MoeForm(
    "mixtral", _mixtral_config,
    lambda i, j, p: f"model.layers.{i}.block_sparse_moe.experts.{j}.{MIXTRAL_PROJ[p]}.weight",
    lambda i: f"model.layers.{i}.block_sparse_moe.gate.weight",
    lambda i, h: {},
)
QWEN2_MOE = MoeForm(
    "qwen2_moe", _qwen2_moe_config,
    lambda i, j, p: f"model.layers.{i}.mlp.experts.{j}.{p}_proj.weight",
    lambda i: f"model.layers.{i}.mlp.gate.weight",
    # a shared expert of width 0 (it adds nothing) and its gate
    lambda i, h: {f"model.layers.{i}.mlp.shared_expert.gate_proj.weight": (0, h),
                  f"model.layers.{i}.mlp.shared_expert.up_proj.weight": (0, h),
                  f"model.layers.{i}.mlp.shared_expert.down_proj.weight": (h, 0),
                  f"model.layers.{i}.mlp.shared_expert_gate.weight": (1, h)},
)
FORMS = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen2": QWEN2_MOE}
BACKBONES = ("uniform", "posterior", "seed")


def moe_form(config) -> MoeForm:
    """The MoE form of a dense family, or a refusal naming the families that have one."""
    form = FORMS.get(config.model_type)
    if form is None:
        raise FamilyError(f"a {config.model_type} forest has no mixture-of-experts form in transformers; families "
                          f"that have one: {', '.join(f'{k} (as {v.model_type})' for k, v in FORMS.items())}")
    for flag in ("attention_bias", "mlp_bias"):
        if form is MIXTRAL and getattr(config, flag, False):
            raise FamilyError(f"this {config.model_type} forest has {flag}=true, which Mixtral cannot hold")
    return form


def backbone_weights(forest: Forest, backbone: str, target: str | os.PathLike | None) -> list[float] | None:
    """The weights of the averaged backbone over the ELMs (None: the seed's own tensors)."""
    n = len(forest)
    if backbone == "uniform":
        return [1.0 / n] * n
    if backbone == "posterior":
        if target is None:
            raise DataError("--backbone posterior needs --target (text of the domain the model is for)")
        from btm.recipes import domain_prior_of

        return domain_prior_of(forest, target)
    if backbone == "seed":
        return None
    raise DataError(f"unknown backbone {backbone!r}; backbones: {', '.join(BACKBONES)}")


def router_samples(forest: Forest, given: dict[str, str | os.PathLike] | None,
                   corpus: str | os.PathLike | None = None) -> dict[str, Path]:
    """Each ELM's domain sample for its router rows: given, else its domain's directory in
    `corpus`, else the domain text its card names."""
    from btm.family import read_card
    from btm.recipes import vector_sample

    given = {k: Path(v) for k, v in (given or {}).items()}
    unknown = sorted(set(given) - set(forest.names()))
    if unknown:
        raise DataError(f"router samples for ELMs not in the forest: {', '.join(unknown)}")
    out = {}
    for e in forest.elms:
        in_corpus = Path(corpus) / e.domain if corpus is not None and e.domain else None
        found = given.get(e.name) or (in_corpus if in_corpus and in_corpus.is_dir() else None) \
            or vector_sample(read_card(e.path))
        if found is None:
            raise DataError(f"no router sample for ELM {e.name!r} (domain {e.domain}): its card names no text on "
                            f"this machine; pass --router-sample {e.name}=FILE (or --router-corpus DIR)")
        out[e.name] = found
    return out


@torch.no_grad()
def router_rows(backbone_dir: Path, tokenizer, samples: list[Path]) -> torch.Tensor:
    """(layers, n, hidden): each layer's mean MLP input over each sample, centred over the
    samples and of unit length."""
    from btm.data import encode_texts, eval_blocks, read_documents, split_source
    from btm.family import load_model
    from btm.model_files import max_positions

    model = load_model(backbone_dir)
    size = min(256, max_positions(model.config) or 256) - 1
    means = []
    for s in samples:
        tokens = encode_texts(tokenizer, read_documents(split_source(s, ("valid", "train"))))
        means.append(_mlp_input_means(model, eval_blocks(tokens, min(size, len(tokens) - 1), ROUTER_BLOCKS)))
    m = torch.stack(means, dim=1)  # (layers, n, hidden)
    m = m - m.mean(dim=1, keepdim=True)
    return (m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()


ROUTER_PARAM = re.compile(r"\.(block_sparse_moe|mlp)\.gate\.weight$")


def tune_router(moe_dir: str | os.PathLike, out: str | os.PathLike, cfg, samples: dict[str, str | os.PathLike] | None = None,
                whole: bool = False, cache_dir: str | os.PathLike | None = None,
                provenance: dict[str, str] | None = None, recipe: str | None = None) -> Path:
    """Train the router of an MoE export (or, with `whole`, every tensor, as BTX does) on a
    balanced mix of its experts' domain samples (their train split where there is one), with
    the architecture's load-balancing loss; btm's training loop (progress bar, resumable).
    `samples`: {expert: text}, by default the router samples its card records. The card
    records `provenance[expert]` for each sample instead of its path, and `recipe`."""
    from btm.data import BlockSampler, split_source, tokenize_file
    from btm.family import load_model
    from btm.tokenizer import load_tokenizer
    from btm.train import train

    moe_dir, out = Path(moe_dir), Path(out)
    card = _read_moe_card(moe_dir)
    found = _expert_samples(card, samples)
    tok = load_tokenizer(moe_dir)
    streams = [tokenize_file(split_source(s, ("train", "valid")), tok, cache_dir) for s in found.values()]
    model = load_model(moe_dir)
    _set_trainable(model, whole)
    model.config.output_router_logits = True  # so the forward returns the load-balancing loss
    card.data = {**card.data, "tuned": {"what": "all" if whole else "router",
                                        "samples": _recorded_samples(found, provenance),
                                        "aux_loss_coef": model.config.router_aux_loss_coef}}
    card.recipe = recipe or _tune_recipe(moe_dir, out, cfg, whole)
    train(model, tok, BlockSampler(streams, cfg.block_size, cfg.seed), cfg, out, card)
    _serving_layout(out)
    return out


def _read_moe_card(moe_dir: Path):
    """The card of an MoE export of elmforest (it names the experts); anything else is refused."""
    from btm.family import read_card

    card = read_card(moe_dir)
    if card.kind != "moe" or not card.data.get("experts"):
        raise DataError(f"{moe_dir}: not a mixture-of-experts export of elmforest (`elmforest forest export --moe`)")
    return card


def _expert_samples(card, samples: dict[str, str | os.PathLike] | None) -> dict[str, str]:
    """{expert: its domain text}, in the experts' order: given, else the router sample the card
    records; refused where any is not on this machine."""
    experts = card.data["experts"]
    found = {**card.data.get("router_samples", {}), **{k: str(v) for k, v in (samples or {}).items()}}
    missing = [e for e in experts if not found.get(e) or not Path(found[e]).exists()]
    if missing:
        raise DataError(f"no domain text on this machine for experts {', '.join(missing)}; pass --sample NAME=FILE")
    return {e: found[e] for e in experts}


def _set_trainable(model, whole: bool) -> None:
    """Only the routers train, or with `whole` every tensor."""
    for name, p in model.named_parameters():
        p.requires_grad = whole or ROUTER_PARAM.search(name) is not None


def _tune_recipe(moe_dir: Path, out: Path, cfg, whole: bool) -> str:
    return (f"elmforest tune-router {moe_dir} --out {out} --steps {cfg.steps} --batch-size "
            f"{cfg.batch_size} --block-size {cfg.block_size} --lr {cfg.lr}" + (" --all" if whole else ""))


def _recorded_samples(samples: dict[str, str | os.PathLike], provenance: dict[str, str] | None) -> dict[str, str]:
    """How a card names each sample: by the provenance given for it, else by its path (which
    another machine may not have)."""
    return {n: (provenance or {}).get(n, str(p)) for n, p in samples.items()}


def _serving_layout(model_dir: Path) -> None:
    """Rewrite a trained MoE with transformers' own writer, which saves each expert under the
    names serving engines read (the training loop writes the module's fused tensors), and
    without the router logits that only training needs."""
    from transformers import AutoModelForCausalLM

    from btm.family import load_model, read_card, write_card

    card = read_card(model_dir)
    trained = load_model(model_dir)
    trained.config.output_router_logits = False
    # a model built from its config saves in the checkpoint layout (one loaded from fused tensors
    # would save them fused again)
    model = AutoModelForCausalLM.from_config(trained.config, dtype=torch.float32)
    model.load_state_dict(trained.state_dict())
    model.save_pretrained(str(model_dir))
    write_card(model_dir, card)


def _mlp_input_means(model, blocks: torch.Tensor) -> torch.Tensor:
    """(layers, hidden): the mean input of each layer's MLP over the blocks (their first token,
    which has no context, left out as the routing vectors leave it)."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)

    def hook(i):
        def add(_module, args) -> None:  # (returning nothing leaves the input as it is)
            sums[i].add_(args[0][:, 1:].double().sum((0, 1)))

        return add

    hooks = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for b in range(0, len(blocks), 8):
            model(input_ids=blocks[b: b + 8], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sums / (blocks.shape[0] * (blocks.shape[1] - 1))


def export_moe(forest: Forest, out: str | os.PathLike, experts_per_token: int = 2, backbone: str = "uniform",
               target: str | os.PathLike | None = None,
               samples: dict[str, str | os.PathLike] | None = None, corpus: str | os.PathLike | None = None,
               weights: Sequence[float] | None = None, provenance: dict[str, str] | None = None,
               recipe: str | None = None) -> Path:
    """Write the forest as a native MoE model directory at `out`. `weights`: the backbone's
    weights over the ELMs when the caller has them (e.g. a target's cached prior computed
    elsewhere) instead of computing them from `target`. The card records `provenance[elm]`
    for each router sample instead of its path, and `recipe` as the command that made it."""
    from btm.family import load_config
    from btm.recipes import per_elm_weights
    from btm.tokenizer import load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; write the MoE into a new directory")
    if not len(forest):
        raise DataError(f"{forest.root}: the forest has no ELMs to make experts of")
    dense = load_config(forest.seed_dir)
    form = moe_form(dense)
    k = max(1, min(experts_per_token, len(forest)))
    if weights is None:
        weights = backbone_weights(forest, backbone, target)
    else:
        weights = per_elm_weights(weights, len(forest), "backbone")
    found = router_samples(forest, samples, corpus)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        back = _backbone(forest, weights, Path(tmp))
        rows = router_rows(back, load_tokenizer(forest.seed_dir), [found[n] for n in forest.names()])
        card = _moe_card(forest, out, form, k, backbone, weights, _recorded_samples(found, provenance), recipe)
        _write_moe(forest, out, form, form.config(dense.to_dict(), len(forest), k), back, rows, card)
    return out


def _backbone(forest: Forest, weights: list[float] | None, tmp: Path) -> Path:
    """The directory of the backbone's tensors: the ELMs averaged with `weights`, or the seed's own."""
    from btm.average import average_models
    from btm.family import Card

    if weights is None:
        return forest.seed_dir
    return average_models([e.path for e in forest.elms], weights, tmp / "backbone",
                          Card(name="backbone", kind="average"), names=forest.names())


def _moe_card(forest: Forest, out: Path, form: MoeForm, k: int, backbone: str, weights: list[float] | None,
             samples: dict[str, str], recipe: str | None):
    """The MoE's card: its experts, backbone, router and the samples behind it, and its recipe."""
    from btm.family import Card

    names = forest.names()
    return Card(name=out.name, kind="moe", data={
        "forest": forest.manifest.get("name"), "forest_version": forest.version, "architecture": form.model_type,
        "experts": names, "experts_per_token": k, "backbone": backbone,
        **({"backbone_weights": {n: round(w, 6) for n, w in zip(names, weights, strict=True)}} if weights else {}),
        "router": "mean hidden state entering each layer's MLP over each ELM's domain sample, centred, unit length",
        "router_samples": samples},
        recipe=recipe or f"elmforest forest export {forest.root} {out} --moe --experts-per-token {k} --backbone {backbone}")


def _write_moe(forest: Forest, out: Path, form: MoeForm, config, backbone: Path, rows: torch.Tensor, card) -> None:
    """The MoE directory: config, tokenizer, weights streamed one tensor at a time, card."""
    from btm.family import copy_aux_files, write_card
    from btm.safetensors_io import DTYPES, ShardedWriter, open_weights, read_tensor

    back = open_weights(backbone)
    elms = [open_weights(e.path) for e in forest.elms]
    layout, sources = [], []  # (name, dtype, shape) and where each tensor comes from
    for name in back.names:
        m = MLP_TENSOR.match(name)
        if m is None:
            layout.append((name, back.info(name).dtype, tuple(back.info(name).shape)))
            sources.append((back, name))
            continue
        for j, idx in enumerate(elms):
            layout.append((form.expert(int(m.group(1)), j, m.group(2)), idx.info(name).dtype, tuple(idx.info(name).shape)))
            sources.append((idx, name))
    dtype = back.info(back.names[0]).dtype
    for i in range(rows.shape[0]):
        layout.append((form.router(i), dtype, tuple(rows[i].shape)))
        sources.append((None, rows[i]))
        for name, shape in form.extra(i, rows.shape[-1]).items():
            layout.append((name, dtype, shape))
            sources.append((None, torch.zeros(shape)))
    copy_aux_files(forest.seed_dir, out)
    config.architectures = [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[form.model_type]]
    config.save_pretrained(str(out))  # over the seed's config.json

    with ShardedWriter(out, layout, {"elmforest": card.to_json()}) as w:
        for (name, dt, _), (idx, src) in zip(layout, sources, strict=True):
            t = src if idx is None else read_tensor(idx.path(src), idx.info(src))
            w.write(name, t.to(DTYPES[dt]))
    write_card(out, card)
