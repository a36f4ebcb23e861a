"""`elmforest` commands for local BTM work: tokenizer, seed, branch, train, forest, eval,
average, generate. Thin wrappers over the library; every option has a default that runs."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from btm.errors import BTMError, DataError
from btm.train_config import TrainConfig

console = Console(stderr=True)

# ---------------------------------------------------------------------- shared options

Seed = Annotated[int, typer.Option("--seed", help="Random seed (initialisation and data order).")]
CacheDir = Annotated[Path | None, typer.Option("--cache-dir", help="Where tokenised splits are cached (default ~/.cache/elmforest/tokens).")]
Revision = Annotated[str | None, typer.Option("--revision", help="With a Hub id: the branch, tag or commit (or write org/name@rev).")]


def _model(spec: str | Path | None, revision: str | None = None):
    """A local model directory, or a Hugging Face Hub model (org/name[@rev]) fetched or found in the cache."""
    from btm.hub import resolve

    if spec is None:
        return None
    r = resolve(spec, revision)
    if r.source:
        from btm.hub import describe

        console.print(f"[dim]{spec}: {describe(r.source)} from the Hugging Face cache[/dim]")
    return r


# The training options of `seed` and `train`, in --help order, with TrainConfig's defaults
# (--steps: each command's own). Each is a TrainConfig field, except seed_ (--seed; `seed`
# would shadow the command) and no_progress (progress=False).
TRAINING_OPTIONS = [
    ("steps", Annotated[int, typer.Option(help="Optimizer updates in this phase.")]),
    ("batch_size", Annotated[int, typer.Option("--batch-size", help="Global batch, in sequences (all processes together).")]),
    ("micro_batch_size", Annotated[int | None, typer.Option("--micro-batch-size", help="Sequences per forward pass per process; the rest is gradient accumulation.")]),
    ("block_size", Annotated[int, typer.Option("--block-size", help="Tokens per training sequence.")]),
    ("lr", Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, then linear decay).")]),
    ("warmup", Annotated[float, typer.Option(help="Warm-up as a fraction of the schedule.")]),
    ("schedule_steps", Annotated[int | None, typer.Option("--schedule-steps", help="Length of the LR schedule when this phase is only its first part (e.g. a seed that is the first half of a dense run).")]),
    ("checkpoint_every", Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable checkpoint every N updates (0: only at the end).")]),
    ("seed_", Seed),
    ("compile", Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]),
    ("precision", Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")]),
    ("no_progress", Annotated[bool, typer.Option("--no-progress", help="No progress bar (metrics still go to metrics.jsonl).")]),
]


def _option_default(name: str, steps: int):
    if name == "steps":
        return steps
    if name == "no_progress":
        return not TrainConfig.progress
    return getattr(TrainConfig, name.rstrip("_"))


def training_options(steps: int):
    """Give a command the TRAINING_OPTIONS (--steps defaulting to `steps`) and call it with the
    TrainConfig they make as `cfg` (the command declares `cfg=None` last). Typer reads the
    options from the wrapper's signature."""

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "cfg"]
        options = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind,
                                     default=_option_default(name, steps))
                   for name, kind in TRAINING_OPTIONS]
        sig = inspect.Signature(own + options)

        @functools.wraps(command)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            o = {name: given.pop(name) for name, _ in TRAINING_OPTIONS}
            cfg = TrainConfig(seed=o.pop("seed_"), progress=not o.pop("no_progress"), **o)
            return command(**given, cfg=cfg)

        run.__signature__ = sig
        run.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
        return run

    return decorate


def _split_list(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


# ---------------------------------------------------------------------- commands


def tokenizer_train(
    corpus: Annotated[Path, typer.Option(help="Corpus directory (<domain>/train.jsonl ...).")],
    out: Annotated[Path, typer.Option(help="Directory to save the tokenizer to.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size")] = 8192,
    domains: Annotated[str | None, typer.Option(help="Comma-separated domains (default: the corpus's train domains).")] = None,
    chars_per_domain: Annotated[int, typer.Option("--chars-per-domain")] = 2_000_000,
):
    """Train a byte-level BPE on a corpus, balanced across domains.

    EXAMPLES
      elmforest tokenizer train --corpus ../shared/corpus --out runs/tokenizer --vocab-size 8192
    """
    from btm.data import Corpus
    from btm.tokenizer import iter_balanced_texts, train_bpe

    c = Corpus(corpus)
    names = _split_list(domains) or c.names("train") or c.names()
    texts = iter_balanced_texts({n: c[n].documents("train") for n in names}, chars_per_domain)
    tok = train_bpe(texts, vocab_size)
    tok.save_pretrained(str(out))
    console.print(f"tokenizer with {len(tok)} tokens saved to {out}")


@training_options(steps=1000)
def seed(
    corpus: Annotated[Path, typer.Option(help="Corpus directory; the seed trains on a balanced mixture of its train domains.")],
    out: Annotated[Path, typer.Option(help="Directory of the seed LM (a Hugging Face model directory).")],
    domains: Annotated[str | None, typer.Option(help="Comma-separated domains (default: the corpus's train domains).")] = None,
    preset: Annotated[str, typer.Option(help="Architecture preset: tiny, mini, small, base, 125m (Llama); gpt2-tiny ... gpt2-125m; qwen2-tiny, gpt-neox-tiny, opt-tiny.")] = "small",
    config: Annotated[Path | None, typer.Option(help="Any Hugging Face causal-LM config directory instead of a preset.")] = None,
    init: Annotated[str | None, typer.Option(help="Start from a pretrained model: a directory or a Hub id org/name[@rev] (its config and tokenizer).")] = None,
    revision: Revision = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory; default: train a byte-level BPE on the corpus.")] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="BPE vocabulary size when training one.")] = 8192,
    kind: Annotated[str, typer.Option(help="seed, or dense for the compute-matched dense baseline.")] = "seed",
    cache_dir: CacheDir = None,
    cfg=None,
):
    """Train the seed LM on a balanced mixture of the corpus's domains.

    Under torchrun the same command trains with DDP. Killed and run again with the same
    options, it resumes from OUT/checkpoint.

    EXAMPLES
      elmforest seed --corpus ../shared/corpus --out runs/seed --preset small --steps 300
      torchrun --nproc-per-node 2 --no-python elmforest seed --corpus data --out runs/seed
    """
    from btm.data import Corpus
    from btm.recipes import train_seed
    from btm.train import setup_distributed

    d = setup_distributed()
    c = Corpus(corpus)
    names = _split_list(domains) or c.names("train") or c.names()
    for n in names:
        c[n]  # noqa: B018 - clear error for a missing domain
    start = _model(init, revision)
    tok = _seed_tokenizer(start.path if start else None, tokenizer, out / "tokenizer", c, names, vocab_size, d)
    model = _seed_model(start.path if start else None, config, preset, tok, cfg.seed)
    train_seed(model, tok, out, [c[n].split_path("train") for n in names], cfg, kind=kind,
               data={"corpus": str(corpus), "domains": names, "mixture": "balanced"},
               source=start.source or {} if start else {}, cache_dir=cache_dir, dist_info=d,
               recipe=f"elmforest seed --corpus {corpus} --out {out} --preset {preset} --steps {cfg.steps} "
               f"--batch-size {cfg.batch_size} --block-size {cfg.block_size}")
    if d.main:
        console.print(f"[green]{kind} LM saved to {out}[/green]")


def _seed_tokenizer(init: Path | None, tokenizer: Path | None, tok_dir: Path, c, names: list[str], vocab_size: int, d):
    """The start's tokenizer, the one given, or a byte-level BPE trained on the domains (by
    the first process; the others wait for it)."""
    from btm.tokenizer import iter_balanced_texts, load_tokenizer, train_bpe

    if init is not None or tokenizer is not None:
        return load_tokenizer(init if init is not None else tokenizer)
    if d.main and not (tok_dir / "tokenizer.json").exists():
        console.print(f"training a {vocab_size}-token byte-level BPE on {', '.join(names)}")
        train_bpe(iter_balanced_texts({n: c[n].documents("train") for n in names}, 2_000_000),
                  vocab_size).save_pretrained(str(tok_dir))
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return load_tokenizer(tok_dir)


def _seed_model(init: Path | None, config: Path | None, preset: str, tok, seed: int):
    """A pretrained start, a model of any transformers config, or one of a preset."""
    from btm.family import load_model, new_model, preset_config

    if init is not None:
        return load_model(init)
    if config is not None:
        from transformers import AutoConfig

        return new_model(AutoConfig.from_pretrained(str(config)), seed)
    return new_model(preset_config(preset, tok), seed)


@training_options(steps=500)
def train_cmd(
    init: Annotated[Path, typer.Option(help="The branch initialisation (a model directory from `elmforest branch`).")],
    out: Annotated[Path, typer.Option(help="Directory of the trained ELM.")],
    data: Annotated[Path | None, typer.Option(help="A domain directory (train.jsonl, ...) or a file/directory of documents.")] = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus directory (with --domain).")] = None,
    domain: Annotated[str | None, typer.Option(help="The domain to train on (a directory of --corpus); also recorded in the card.")] = None,
    mixture: Annotated[bool, typer.Option("--mixture", help="Train on a balanced mixture of all the corpus's train domains (the dense baseline).")] = False,
    continue_schedule: Annotated[bool, typer.Option("--continue-schedule", help="Continue the init's LR schedule where it stopped (compute-matched BTM).")] = False,
    fresh_optimizer: Annotated[bool, typer.Option("--fresh-optimizer", help="Ignore optimizer state that came with the init.")] = False,
    cache_dir: CacheDir = None,
    cfg=None,
):
    """Train an ELM from its branch init on its own domain (or the dense baseline on a mixture).

    EXAMPLES
      elmforest train --init runs/init-python --corpus ../shared/corpus --domain python --out runs/python --steps 300
      elmforest train --init runs/init-mine --data ~/my-texts --domain my-notes --out runs/mine
    """
    from btm.recipes import train_elm
    from btm.train import setup_distributed

    d = setup_distributed()
    sources, data_desc = _training_sources(data, corpus, domain, mixture)
    train_elm(init, out, sources, cfg, domain=domain, kind="dense" if mixture else "elm", data=data_desc,
              cache_dir=cache_dir, carry_optimizer=not fresh_optimizer, continue_schedule=continue_schedule,
              recipe=f"elmforest train --init {init} --out {out} --steps {cfg.steps} --batch-size {cfg.batch_size} "
              f"--block-size {cfg.block_size}", dist_info=d)
    if d.main:
        console.print(f"[green]ELM saved to {out}[/green]")


def _training_sources(data: Path | None, corpus: Path | None, domain: str | None,
                      mixture: bool) -> tuple[list[Path], dict]:
    """What `elmforest train` trains on (its text files) and how its card describes that."""
    from btm.data import Corpus, split_source

    if mixture:
        if corpus is None:
            raise DataError("--mixture needs --corpus")
        c = Corpus(corpus)
        names = c.names("train") or c.names()
        return [c[n].split_path("train") for n in names], {"corpus": str(corpus), "domains": names, "mixture": "balanced"}
    if corpus is not None:
        if not domain:
            raise DataError("--corpus needs --domain (which domain to train on)")
        return [Corpus(corpus)[domain].split_path("train")], {"corpus": str(corpus), "domain": domain}
    if data is not None:
        return [split_source(data, ("train",))], {"source": str(data)}
    raise DataError("say what to train on: --corpus DIR --domain NAME, or --data PATH")


branch_app = typer.Typer(help="Make a new ELM's initialisation (locally; `branch request` asks a coordinator).")


@branch_app.callback(invoke_without_command=True)
def branch_cmd(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(help="Directory of the new ELM's initialisation.")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Branch from this one model: a directory (the seed, an ELM) or a Hub id org/name[@rev].")] = None,
    revision: Revision = None,
    forest: Annotated[Path | None, typer.Option(help="Branch from a forest (posterior-weighted average of its ELMs).")] = None,
    sample: Annotated[Path | None, typer.Option(help="A sample of the new domain: a .jsonl/.txt file or a directory.")] = None,
    method: Annotated[str, typer.Option(help="posterior (paper's best), argmax (nearest ELM), uniform, or seed.")] = "posterior",
    domain: Annotated[str | None, typer.Option(help="The new domain's name (recorded in the card).")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="Tokens per sample block for the posterior.")] = 256,
    max_blocks: Annotated[int, typer.Option("--max-blocks", help="Sample blocks used for the posterior (paper: 100).")] = 100,
    carry_optimizer: Annotated[bool, typer.Option("--carry-optimizer", help="Carry the parents' optimizer state (averaged with the same weights).")] = False,
):
    """Make the initialisation of a new ELM: from one model, or from a forest weighted by the
    domain posterior of a sample of the new domain.

    EXAMPLES
      elmforest branch --from runs/seed --out runs/init-python --domain python
      elmforest branch --forest forest --sample ~/my-texts/valid.jsonl --out runs/init-mine --domain mine
      elmforest branch request --forest demo --domain mine --data ~/my-texts --out runs/init   (a coordinator)
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise BTMError("--out is required: the directory to write the new ELM's initialisation to")
    from btm.branch import branch as do_branch
    from btm.branch import branch_from_model
    from btm.forest import Forest

    if (from_ is None) == (forest is None):
        raise BTMError("give exactly one of --from MODEL_DIR or --forest FOREST_DIR")
    if from_ is not None:
        start = _model(from_, revision)
        hub = start.source["hub"] if start.source else None
        parent = branch_from_model(start.path, out, domain, carry_optimizer, name=hub, source=start.source)
        console.print(f"branch init for {domain or out.name} from {hub or parent.name} saved to {out}")
        return
    f = Forest.load(forest)
    if method in ("posterior", "argmax") and sample is None and len(f):
        raise DataError(f"--method {method} needs --sample (a sample of the new domain's text)")
    path, plan = do_branch(f, out, sample, method, domain, block_size, max_blocks, carry_optimizer=carry_optimizer)
    console.print(f"branch init ({plan.method}) saved to {path}")
    for n, w in zip(plan.names, plan.weights, strict=True):
        if w > 0:
            console.print(f"  {n:<24} {w:.4f}")


def _named_dirs(option: str, values: list[str] | None) -> dict[str, Path]:
    """Repeated NAME=DIR options as {name: dir}."""
    out = {}
    for x in values or []:
        if "=" not in x:
            raise BTMError(f"{option} {x!r}: use NAME=DIR")
        k, v = x.split("=", 1)
        out[k] = Path(v)
    return out


def _max_positions(config) -> int:
    from btm.model_files import max_positions

    return max_positions(config) or 1 << 30


# ---------------------------------------------------------------------- forest


forest_app = typer.Typer(help="Create and change a forest on disk: init, add, remove, list, show, export, import, verify.",
                         no_args_is_help=True)


@forest_app.command("init")
def forest_init(
    forest: Annotated[Path, typer.Argument(help="Directory of the new forest.")],
    seed_dir: Annotated[str, typer.Option("--seed", help="The seed LM: a directory or a Hub id org/name[@rev].")],
    name: Annotated[str | None, typer.Option(help="The forest's name.")] = None,
    revision: Revision = None,
):
    """Create a forest rooted at a seed LM.

    EXAMPLES
      elmforest forest init forest --seed runs/seed --name debian
      elmforest forest init forest --seed meta-llama/Llama-3.2-1B@main
    """
    from btm.forest import Forest

    seed = _model(seed_dir, revision)
    f = Forest.init(forest, seed.path, name, source=seed.source)
    console.print(f"forest {f.manifest['name']!r} (version {f.version}) created at {forest}")


@forest_app.command("add")
def forest_add(
    forest: Annotated[Path, typer.Argument(help="The forest directory.")],
    elm: Annotated[str, typer.Argument(help="A trained ELM: a directory or a Hub id org/name[@rev].")],
    name: Annotated[str | None, typer.Option(help="Name in the forest (default: the ELM's card name, or the Hub repository's name).")] = None,
    domain: Annotated[str | None, typer.Option(help="Domain (default: the ELM's card).")] = None,
    revision: Revision = None,
    sample: Annotated[Path | None, typer.Option(help="Text of the ELM's domain, for its routing vector (default: the text its card names, or its branch init's vector).")] = None,
):
    """Add an ELM (checked to be of the seed's family); writes a new version. A Hub model is
    recorded with its repository and the commit it resolved to. The ELM's routing vector (the
    seed's mean hidden state over its domain's text, for the centroid router) is stored with it.

    EXAMPLES
      elmforest forest add forest runs/python --domain python
      elmforest forest add forest example/tiny-llama-python@main --domain python --sample python/valid.jsonl
      HF_HUB_OFFLINE=1 elmforest forest add forest example/tiny-llama-python --revision v1
    """
    from btm.forest import Forest
    from btm.recipes import add_elm

    f = Forest.load(forest)
    model = _model(elm, revision)
    if model.source and not name:
        name = model.source["hub"].split("/")[-1].lower()
    e, note = add_elm(f, model.path, name, domain, sample=sample, source=model.source)
    console.print(f"added {e.name} (domain {e.domain}); forest is now version {f.version}")
    if note:
        console.print(f"[yellow]{note}[/yellow]")


@forest_app.command("vectors")
def forest_vectors(
    forest: Annotated[Path, typer.Argument(help="The forest directory.")],
    corpus: Annotated[Path | None, typer.Option(help="A corpus whose domain directories are named as the ELMs' domains.")] = None,
    sample: Annotated[list[str] | None, typer.Option(help="NAME=FILE: the domain text of ELM NAME (repeatable).")] = None,
):
    """Compute the ELMs' routing vectors (for the centroid router) of a forest made without
    them; writes a new version. Each ELM's vector comes from its domain's text.

    EXAMPLES
      elmforest forest vectors forest --corpus ../shared/corpus
      elmforest forest vectors forest --sample python=~/python/valid.jsonl --sample legal=~/legal
    """
    from btm.forest import Forest
    from btm.recipes import compute_vectors

    f = Forest.load(forest)
    samples = {n: str(p) for n, p in _named_dirs("--sample", sample).items()}
    if corpus is not None:
        for e in f.elms:
            if e.name not in samples and e.domain and (corpus / e.domain).is_dir():
                samples[e.name] = str(corpus / e.domain)
    missing = compute_vectors(f, samples)
    console.print(f"routing vectors for {len(samples)} ELM(s); forest is now version {f.version}")
    if missing:
        console.print(f"[yellow]still without a vector: {', '.join(missing)} (give --sample NAME=FILE)[/yellow]")


@forest_app.command("remove")
def forest_remove(
    forest: Annotated[Path, typer.Argument(help="The forest directory.")],
    name: Annotated[str, typer.Argument(help="The ELM to remove.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the forest's history).")],
    keep_files: Annotated[bool, typer.Option("--keep-files", help="Keep the ELM's files on disk.")] = False,
    with_descendants: Annotated[bool, typer.Option("--with-descendants", help="Also forget the ELMs that carry "
                                                   ">= 0.1 of its weights (branched from it).")] = False,
    keep_descendants: Annotated[bool, typer.Option("--keep-descendants", help="Keep them (recorded).")] = False,
):
    """Remove (forget) an ELM; writes a new version with the reason. ELMs branched from it
    that carry >= 0.1 of its weights are listed and need --with-descendants or
    --keep-descendants.

    EXAMPLES
      elmforest forest remove forest fortunes --reason "license withdrawn"
      elmforest forest remove forest fortunes --reason "license withdrawn" --with-descendants
    """
    from btm.forest import Forest

    if with_descendants and keep_descendants:
        raise BTMError("pass one of --with-descendants and --keep-descendants")
    f = Forest.load(forest)
    gone = f.remove(name, reason, delete_files=not keep_files,
                    descendants="remove" if with_descendants else "keep" if keep_descendants else None)
    console.print(f"removed {', '.join(gone)}; forest is now version {f.version}")


@forest_app.command("list")
def forest_list(forest: Annotated[Path, typer.Argument(help="The forest directory.")]):
    """List the ELMs of a forest.

    EXAMPLES
      elmforest forest list runs/forest
    """
    from rich.table import Table

    from btm.forest import Forest

    f = Forest.load(forest)
    t = Table(title=f"{f.manifest['name']} v{f.version}")
    for c in ("name", "domain", "parents", "tokens", "added"):
        t.add_column(c)
    for e in f.elms:
        parents = ", ".join(f"{p['name']}:{p['weight']:.2f}" for p in e.parents) or (
            f"imported: {e.entry['source']['hub']}" if e.entry.get("source") else "")
        t.add_row(e.name, e.domain or "", parents, str(e.entry.get("training", {}).get("tokens", "")), e.entry.get("added", ""))
    Console().print(t)


@forest_app.command("show")
def forest_show(
    forest: Annotated[Path, typer.Argument(help="The forest directory.")],
    name: Annotated[str | None, typer.Argument(help="An ELM (default: the whole manifest).")] = None,
):
    """Print the manifest, or one ELM's entry, as JSON.

    EXAMPLES
      elmforest forest show runs/forest python
    """
    from btm.forest import Forest

    f = Forest.load(forest)
    print(json.dumps(f.get(name).entry if name else f.manifest, indent=2))


@forest_app.command("export")
def forest_export(
    forest: Annotated[Path, typer.Argument(help="The forest directory.")],
    out: Annotated[Path, typer.Argument(help="A new directory: the Hub repository to push.")],
    average: Annotated[list[str] | None, typer.Option("--average", help="Include an averaged model NAME=DIR (from `elmforest average`). Repeatable.")] = None,
    uniform: Annotated[bool, typer.Option("--uniform", help="Build and include the uniform average.")] = False,
    moe: Annotated[bool, typer.Option("--moe", help="Write one native mixture-of-experts model instead (Mixtral for Llama/Mistral forests, Qwen2-MoE for Qwen2): the ELMs' MLPs as experts.")] = False,
    experts_per_token: Annotated[int, typer.Option("--experts-per-token", help="With --moe: experts each token runs.")] = 2,
    backbone: Annotated[str, typer.Option(help="With --moe: every tensor but the MLPs is the uniform or posterior (--target) average of the ELMs, or the seed's.")] = "uniform",
    target: Annotated[Path | None, typer.Option(help="With --moe --backbone posterior: text of the target domain.")] = None,
    router_sample: Annotated[list[str] | None, typer.Option("--router-sample", help="With --moe: NAME=FILE, the domain text behind ELM NAME's router rows (default: the text its card names). Repeatable.")] = None,
    router_corpus: Annotated[Path | None, typer.Option("--router-corpus", help="With --moe: a corpus whose domain directories are named as the ELMs' domains, for their router rows.")] = None,
):
    """Write a forest as a Hugging Face Hub repository: a model card with the domain table and
    lineage, forest.json, the seed and one folder per ELM, the averages asked for, and a
    config.json and the model's code that load the ensemble with transformers, elmforest
    installed or not (trust_remote_code). With --moe, one native mixture-of-experts model that
    plain transformers loads with no code of ours.

    EXAMPLES
      elmforest forest export forest hub/debian-forest --uniform
      hf upload my-org/debian-forest hub/debian-forest
      elmforest forest export forest hub/debian-moe --moe --experts-per-token 2 --router-sample go=go/valid.jsonl
    """
    import tempfile

    from btm.export import export
    from btm.forest import Forest

    f = Forest.load(forest)
    if moe:
        from btm.moe import export_moe

        samples = {n: str(p) for n, p in _named_dirs("--router-sample", router_sample).items()}
        export_moe(f, out, experts_per_token, backbone, target, samples, router_corpus)
        console.print(f"{f.manifest['name']} v{f.version} written to {out} as one mixture-of-experts model "
                      f"({len(f)} experts, {min(experts_per_token, len(f))} per token)")
        return
    averages = _named_dirs("--average", average)
    with tempfile.TemporaryDirectory() as td:
        if uniform:
            from btm.recipes import average_forest

            averages["uniform"] = average_forest(f, Path(td) / "uniform", "uniform")[0]
        export(f, out, averages)
    console.print(f"{f.manifest['name']} v{f.version} written to {out} ({len(f)} ELMs"
                  + (f", averages {', '.join(averages)}" if averages else "") + "); push it with `hf upload ORG/NAME "
                  f"{out}`")


@forest_app.command("import")
def forest_import(
    src: Annotated[str, typer.Argument(help="An exported forest: a directory or a Hub id org/name[@rev].")],
    out: Annotated[Path, typer.Argument(help="The new forest directory.")],
    revision: Revision = None,
):
    """Read a forest in the Hub layout (a directory or a Hub repository) into a forest
    directory; every file is checked against the manifest's sha256.

    EXAMPLES
      elmforest forest import my-org/debian-forest forest
      HF_HUB_OFFLINE=1 elmforest forest import my-org/debian-forest@v3 forest
    """
    from btm.export import import_

    f = import_(src, out, revision)
    console.print(f"{f.manifest['name']} v{f.version} ({len(f)} ELMs) imported to {out}; all files match the manifest")


@forest_app.command("verify")
def forest_verify(forest: Annotated[Path, typer.Argument(help="The forest directory.")]):
    """Check every file against the sha256 in the manifest.

    EXAMPLES
      elmforest forest verify runs/forest
    """
    from btm.forest import Forest

    problems = Forest.load(forest).verify()
    for p in problems:
        console.print(f"[red]{p}[/red]")
    if problems:
        raise typer.Exit(1)
    console.print("all files match the manifest")


# ---------------------------------------------------------------------- inference


def eval_cmd(
    forest: Annotated[Path, typer.Option(help="The forest directory.")],
    corpus: Annotated[Path | None, typer.Option(help="Corpus with the domains to evaluate on (test split; valid for the prior).")] = None,
    text: Annotated[Path | None, typer.Option(help="An unlabelled text (.jsonl/.txt file or directory) instead of a corpus: each ELM, and the forest routed by the text itself.")] = None,
    domains: Annotated[str | None, typer.Option(help="Comma-separated domains (default: all of the corpus).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="Also score NAME=DIR (e.g. the dense baseline). Repeatable.")] = None,
    top_k: Annotated[str, typer.Option("--top-k", help="Comma-separated k for top-k ensembles.")] = "1,2,4",
    block_size: Annotated[int, typer.Option("--block-size")] = 256,
    max_eval_blocks: Annotated[int | None, typer.Option("--max-eval-blocks", help="Cap on test blocks per domain.")] = None,
    prior_blocks: Annotated[int, typer.Option("--prior-blocks", help="Development blocks for the cached prior (paper: 100).")] = 100,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON here.")] = None,
    work_dir: Annotated[Path | None, typer.Option("--work-dir", help="Where averaged models are built (default: FOREST/.eval).")] = None,
    cache_dir: CacheDir = None,
):
    """Per-domain perplexity of every ELM, the ensemble (all, top-k), the averages
    (uniform, argmax, posterior) and any extra model; or, with --text, the perplexity of an
    unlabelled text under each ELM and under the forest routed by the text (no domain needed).

    EXAMPLES
      elmforest eval --forest forest --corpus ../shared/corpus --model dense=runs/dense --json eval.json
      elmforest eval --forest forest --text mixed.jsonl --top-k 1,2
    """
    from btm.data import Corpus
    from btm.evaluate import domain_blocks, evaluate_forest, table
    from btm.forest import Forest
    from btm.tokenizer import load_tokenizer

    f = Forest.load(forest)
    if (corpus is None) == (text is None):
        raise BTMError("give --corpus DIR (labelled domains) or --text FILE (an unlabelled text), one of them")
    if text is not None:
        _eval_text(f, text, [int(k) for k in _split_list(top_k) or []], block_size, max_eval_blocks, json_out)
        return
    c = Corpus(corpus)
    names = _split_list(domains) or c.names()
    tok = load_tokenizer(f.seed_dir)
    doms = domain_blocks(c, names, tok, block_size, max_eval_blocks, prior_blocks, cache_dir)
    extra = _named_dirs("--model", model)
    ks = [int(k) for k in _split_list(top_k) or []]
    report = evaluate_forest(f, doms, work_dir or (forest / ".eval"), ks, extra_models=extra,
                             progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    print(table(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
        console.print(f"report written to {json_out}")


def _eval_text(f, text: Path, ks: list[int], block_size: int, max_blocks: int | None, json_out: Path | None) -> None:
    from btm.branch import sample_blocks
    from btm.evaluate import evaluate_text
    from btm.family import load_config

    blocks = sample_blocks(f, text, min(block_size, _max_positions(load_config(f.seed_dir)) - 1), max_blocks)
    report = evaluate_text(f, blocks, ks)
    for r in report["rows"]:
        print(f"{r['subject']:<24} {r['ppl']:>10.2f}")
    if not report["routing_vectors"]:
        from btm.routing import missing_vectors_note

        console.print(f"[yellow]{missing_vectors_note(f.root)}[/yellow]")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))
        console.print(f"report written to {json_out}")


def average_cmd(
    forest: Annotated[Path, typer.Option(help="The forest directory.")],
    out: Annotated[Path, typer.Option(help="Directory of the averaged model.")],
    method: Annotated[str, typer.Option(help="posterior (weights = the target's cached prior), argmax, or uniform.")] = "posterior",
    target: Annotated[Path | None, typer.Option(help="Development text of the target domain (.jsonl/.txt file or directory).")] = None,
    weights: Annotated[str | None, typer.Option(help="Explicit weights NAME=W,... instead of a target.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Output dtype: F32, F16 or BF16 (default: the inputs').")] = None,
    max_shard_size: Annotated[int | None, typer.Option("--max-shard-bytes", help="Shard the output above this many bytes.")] = None,
    block_size: Annotated[int, typer.Option("--block-size")] = 256,
    max_blocks: Annotated[int, typer.Option("--max-blocks")] = 100,
):
    """Collapse the forest into one model by a parameter average, streamed tensor by tensor.

    EXAMPLES
      elmforest average --forest forest --target ../shared/corpus/go/valid.jsonl --out runs/avg-go
      elmforest average --forest forest --method uniform --out runs/avg-uniform
    """
    from btm.forest import Forest
    from btm.recipes import average_forest

    explicit = {n: float(x) for n, x in (p.split("=", 1) for p in _split_list(weights) or [])} if weights else None
    f = Forest.load(forest)
    _, method, w = average_forest(f, out, method, target, explicit, out_dtype=dtype, max_shard_bytes=max_shard_size,
                                  block_size=block_size, max_blocks=max_blocks)
    names = f.names()
    console.print(f"averaged model ({method}) saved to {out}")
    for n, x in zip(names, w, strict=True):
        if x > 0:
            console.print(f"  {n:<24} {x / sum(w):.4f}")


Router = Annotated[str | None, typer.Option(help="How each text chooses its experts: prompt (its posterior over every ELM), centroid (one seed pass against the ELMs' routing vectors) or prior (the target's cached prior). Default: prior with --target, else centroid where the forest has vectors, else prompt.")]


def generate_cmd(
    forest: Annotated[Path, typer.Option(help="The forest directory.")],
    prompt: Annotated[list[str], typer.Option(help="Text to continue; repeat for a batch.")],
    target: Annotated[Path | None, typer.Option(help="Development text of the target domain, for a cached prior (default: none; each prompt is routed).")] = None,
    router: Router = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts to run.")] = 2,
    reroute_every: Annotated[int | None, typer.Option("--reroute-every", help="Choose the experts again every N new tokens, from the text so far.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 100,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    sample_top_k: Annotated[int | None, typer.Option("--sample-top-k", help="Sample among the k likeliest tokens.")] = None,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop a continuation at this text (\\n and \\t as escapes); repeatable.")] = None,
    seed_: Seed = 0,
):
    """Generate text with the top-k ensemble of a forest (decoded by transformers' generate()).
    Each prompt runs the experts that fit it, printed above its text.

    EXAMPLES
      elmforest generate --forest forest --prompt "package main" --prompt "And God said" --top-k 2
      elmforest generate --forest forest --prompt "def parse(" --router prompt --reroute-every 32
      elmforest generate --forest forest --prompt "def parse(" --target ../shared/corpus/python/valid.jsonl
      elmforest generate --forest forest --prompt "import os" --prompt "#include" --temperature 0 --stop "\\n\\n"
    """
    from btm.ensemble import EnsembleLM
    from btm.forest import Forest
    from btm.recipes import routing
    from btm.tokenizer import load_tokenizer

    f = Forest.load(forest)
    r = routing(f, router=router, target=target)
    ens = EnsembleLM(r.paths, r.prior, top_k, names=r.names, tokenizer=load_tokenizer(f.seed_dir), router=r.router,
                     routing_vectors=r.vectors, seed=r.seed)
    extra = dict(repetition_penalty=repetition_penalty)
    if sample_top_k:
        extra["top_k"] = sample_top_k
    if stop:  # a shell passes "\n" as backslash-n
        extra["stop_strings"] = [x.replace("\\n", "\n").replace("\\t", "\t") for x in stop]
    texts = ens.generate(prompt, max_new_tokens, temperature, top_p, seed_, reroute_every=reroute_every, **extra)
    for text, route in zip(texts, ens.last_routes, strict=True):
        console.print(f"[dim]experts ({ens.router} router): {route}[/dim]", highlight=False)
        print(text)


@training_options(steps=200)
def tune_router_cmd(
    moe: Annotated[Path, typer.Argument(help="A mixture-of-experts export (`elmforest forest export --moe`).")],
    out: Annotated[Path, typer.Option(help="Directory of the tuned model.")],
    sample: Annotated[list[str] | None, typer.Option(help="NAME=FILE: expert NAME's domain text (default: the router samples its card records). Repeatable.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Train every tensor, not only the routers (as Branch-Train-MiX does).")] = False,
    cache_dir: CacheDir = None,
    cfg=None,
):
    """Tune the routers of an MoE export on a balanced mix of its experts' domain text, with
    the architecture's load-balancing loss (only the router rows change unless --all).
    Resumable: run it again after an interruption. The card records the recipe.

    EXAMPLES
      elmforest tune-router runs/hf-moe --out runs/hf-moe-tuned --steps 200 --lr 1e-3
      elmforest tune-router runs/moe --out runs/moe-btx --all --sample python=~/python
    """
    from btm.moe import tune_router

    samples = {n: str(p) for n, p in _named_dirs("--sample", sample).items()}
    tune_router(moe, out, cfg, samples, all_, cache_dir)
    console.print(f"[green]tuned ({'every tensor' if all_ else 'routers'}) model saved to {out}[/green]")


def lm_eval_cmd(ctx: typer.Context):
    """Run lm-evaluation-harness with the forest as a model: lm-eval's own command line, every
    argument passed on unchanged, the `elmforest` model registered (model_args: forest=DIR,
    top_k=K, router=prompt|centroid|prior, target=FILE). -h shows lm-eval's own options.

    EXAMPLES
      elmforest lm-eval --model elmforest --model_args forest=forest,top_k=2 --tasks lambada_openai
      elmforest lm-eval --model elmforest --model_args forest=forest,target=go/valid.jsonl --tasks demo_mc --include_path examples/lm_eval_tasks
      lm_eval --model hf --model_args pretrained=hub/debian-forest,trust_remote_code=True --tasks lambada_openai   (an export)
    """
    from btm.lm_eval_harness import run_cli

    run_cli(ctx.args)


def register(app: typer.Typer, panel: str) -> None:
    """Add the local BTM commands (no coordinator needed) to `app`, under `panel`."""
    tok_app = typer.Typer(help="Tokenizers.", no_args_is_help=True)
    tok_app.command("train")(tokenizer_train)
    for name, fn in [("seed", seed), ("train", train_cmd), ("eval", eval_cmd), ("average", average_cmd),
                     ("generate", generate_cmd), ("tune-router", tune_router_cmd)]:
        app.command(name, rich_help_panel=panel)(fn)
    app.command("lm-eval", rich_help_panel=panel,  # the rest of the line is lm-eval's
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(lm_eval_cmd)
    for name, sub in [("tokenizer", tok_app), ("branch", branch_app), ("forest", forest_app)]:
        app.add_typer(sub, name=name, rich_help_panel=panel)
