"""Branching: the initialisation of a new ELM for a new domain.

The paper's best initialisation is the posterior-weighted average of the existing ELMs, the
posterior computed on a sample of the new domain. The nearest ELM (argmax) and the seed are
the alternatives; with no ELMs yet, every method starts from the seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from btm.average import average_files, average_models, method_weights
from btm.checkpoint import checkpoint_optimizer
from btm.data import encode_texts, eval_blocks, read_documents, split_source
from btm.errors import DataError
from btm.family import Card, read_card, write_card
from btm.forest import Forest, copy_model_dir
from btm.model_files import OPTIMIZER, WEIGHTS_FILE
from btm.posterior import domain_prior
from btm.tokenizer import load_tokenizer

BRANCH_METHODS = ("posterior", "argmax", "uniform", "seed")


@dataclass
class BranchPlan:
    method: str
    names: list[str]  # candidate parents (the forest's ELMs, or ["seed"])
    sources: list[Path]
    posterior: list[float] | None
    weights: list[float]


def sample_blocks(forest: Forest, sample: str | os.PathLike, block_size: int, max_blocks: int):
    """Blocks of a domain sample (a file or directory of documents), with the forest's tokenizer."""
    tok = load_tokenizer(forest.seed_dir)
    # a domain directory: its validation split, else its training split
    tokens = encode_texts(tok, read_documents(split_source(sample, ("valid", "train"))))
    if len(tokens) == 0:
        raise DataError(f"{sample}: the sample holds no text")
    bs = min(block_size, max(8, len(tokens) - 1))
    return eval_blocks(tokens, bs, max_blocks)


def plan_branch(forest: Forest, blocks, method: str = "posterior", batch_size: int = 16,
                posterior: list[float] | None = None) -> BranchPlan:
    """Decide the parents and weights of a new ELM. `posterior` may be given (computed
    privately elsewhere); else it is computed from `blocks` over the forest's ELMs."""
    if method not in BRANCH_METHODS:
        raise ValueError(f"unknown branch method {method!r}; methods: {', '.join(BRANCH_METHODS)}")
    elms = forest.elms
    if method == "seed" or not elms:
        return BranchPlan("seed", ["seed"], [forest.seed_dir], None, [1.0])
    names = [e.name for e in elms]
    sources = [e.path for e in elms]
    if posterior is None and method != "uniform":
        if blocks is None or len(blocks) == 0:
            raise DataError("branching by posterior needs a non-empty sample of the new domain")
        posterior = domain_prior(sources, blocks, batch_size).tolist()
    if posterior is not None and len(posterior) != len(names):
        raise DataError(f"the posterior has {len(posterior)} weights but the forest has {len(names)} ELMs")
    weights = method_weights(method, posterior, len(names))
    return BranchPlan(method, names, sources, posterior, weights)


def write_branch_init(forest: Forest, plan: BranchPlan, out_dir: str | os.PathLike, domain: str | None = None,
                      carry_optimizer: bool = False, name: str | None = None, origin: dict | None = None) -> Path:
    """Write the init as an HF directory whose card names its parents and weights."""
    out = Path(out_dir)
    live = _live_parents(forest, plan)
    card = _init_card(forest, plan, live, name or out.name, domain, origin)
    if len(live) == 1:
        # a copy of one parent: its weights keep their own embedded card, the README is ours
        copy_model_dir(live[0][1], out)
        card.family = read_card(out).family
        write_card(out, card)
    else:
        average_models([s for _, s, _ in live], [w for *_, w in live], out, card, names=[n for n, *_ in live])
    if carry_optimizer:
        _average_optimizers(live, out)
    return out


def _live_parents(forest: Forest, plan: BranchPlan) -> list[tuple[str, Path, float]]:
    """(name, source, weight) of the parents of positive weight, each checked against the seed's family."""
    live = [(n, s, w) for n, s, w in zip(plan.names, plan.sources, plan.weights, strict=True) if w > 0]
    for n, s, _ in live:  # an init is trained and added back: it must be of the seed's family
        if Path(s) != forest.seed_dir:
            forest.check_family(s, f"ELM {n!r} ({s})")
    return live


def _init_card(forest: Forest, plan: BranchPlan, live: list[tuple[str, Path, float]], name: str,
               domain: str | None, origin: dict | None) -> Card:
    """The init's card: its parents' normalised weights, the plan, and the posterior it came from."""
    total = sum(w for *_, w in live)
    card = Card(
        name=name,
        kind="branch-init",
        domain=domain,
        parents=[{"name": n, "weight": float(w / total)} for n, _, w in live],
        data={"branch_method": plan.method, "forest_version": forest.version, "forest": forest.manifest.get("name")},
        origin=origin or {"forest": forest.manifest.get("name"), "version": forest.version},
    )
    if plan.posterior is not None:
        card.metrics = {f"posterior/{n}": round(float(p), 6) for n, p in zip(plan.names, plan.posterior, strict=True)}
    return card


def _average_optimizers(live: list[tuple[str, Path, float]], out: Path) -> None:
    """The parents' optimizer states averaged as the init's, where every parent has one."""
    opts = [(checkpoint_optimizer(s), w) for _, s, w in live]
    if all(p is not None for p, _ in opts):
        average_files([p for p, _ in opts], [w for _, w in opts], out / "_opt")
        os.replace(out / "_opt" / WEIGHTS_FILE, out / OPTIMIZER)
        (out / "_opt").rmdir()


def branch(forest: Forest, out_dir, sample=None, method: str = "posterior", domain: str | None = None,
           block_size: int = 256, max_blocks: int = 100, batch_size: int = 16,
           carry_optimizer: bool = False, posterior: list[float] | None = None) -> tuple[Path, BranchPlan]:
    blocks = None
    if sample is not None and posterior is None and method in ("posterior", "argmax") and len(forest):
        blocks = sample_blocks(forest, sample, block_size, max_blocks)
    plan = plan_branch(forest, blocks, method, batch_size, posterior)
    out = write_branch_init(forest, plan, out_dir, domain, carry_optimizer)
    return out, plan


def branch_from_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, domain: str | None = None,
                      carry_optimizer: bool = False, name: str | None = None, source: dict | None = None) -> Card:
    """A new ELM's initialisation copied from one model (the seed, an ELM, a Hub model):
    its files, its optimizer state if asked, and a card naming it the one parent (`name`,
    default the model's own card name; `source`: where a Hub model came from). Returns the
    parent's card."""
    import shutil

    out = Path(out_dir)
    parent = read_card(model_dir)
    copy_model_dir(model_dir, out)
    if carry_optimizer:
        opt = checkpoint_optimizer(model_dir)
        if opt is None:
            raise DataError(f"{model_dir}: no optimizer state saved with this model to carry")
        shutil.copyfile(opt, out / OPTIMIZER)
    write_card(out, Card(name=out.name, kind="branch-init", domain=domain,
                         parents=[{"name": name or parent.name, "weight": 1.0}], data={"branch_method": "copy"},
                         family=parent.family, source=source or {}))
    return parent


__all__ = ["BRANCH_METHODS", "BranchPlan", "branch", "branch_from_model", "plan_branch", "sample_blocks",
           "write_branch_init"]
