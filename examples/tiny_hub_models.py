"""Put a tiny Llama-family base model and three fine-tunes of it into the local Hugging Face
Hub cache, as if downloaded from the Hub, so the README's "A forest from existing models"
runs offline (and so do the tests):

    example/tiny-llama-base       trained briefly on all the demo corpus's train domains
    example/tiny-llama-python     the base fine-tuned on python
    example/tiny-llama-bible      ... on kjv_bible
    example/tiny-llama-postgres   ... on postgres_docs

They are plain transformers models (save_pretrained, no elmforest card), like any on the Hub.
With the Hub reachable, the same commands take real Hub ids instead.

    python examples/tiny_hub_models.py [--cache DIR]   # default: the Hub cache (HF_HUB_CACHE / HF_HOME)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "btm" / "demo_corpus"
FINE_TUNES = {"python": "python", "bible": "kjv_bible", "postgres": "postgres_docs"}


def build(cache: Path | None = None, base_steps: int = 60, tune_steps: int = 40, quiet: bool = True) -> dict[str, str]:
    """Train the models and add them to the cache; returns {repo id: commit}."""
    from transformers import AutoModelForCausalLM

    from btm.data import BlockSampler, Corpus, tokenize_file
    from btm.family import Card, load_model, new_model, preset_config
    from btm.hub import add_to_cache
    from btm.tokenizer import iter_balanced_texts, train_bpe
    from btm.train import TrainConfig, train

    corpus = Corpus(CORPUS)
    train_domains = corpus.names("train")
    commits = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        tok = train_bpe(iter_balanced_texts({d: corpus[d].documents("train") for d in train_domains}, 200_000), 1024)

        def stream(domains):
            return BlockSampler([tokenize_file(corpus[d].split_path("train"), tok, td / "tokens") for d in domains], 64)

        def cfg(steps):
            return TrainConfig(steps=steps, batch_size=8, block_size=64, lr=3e-3, progress=not quiet, log_every=20)

        def publish(trained: Path, repo: str) -> None:  # as a plain transformers model, no elmforest card
            clean = td / "hub" / repo
            AutoModelForCausalLM.from_pretrained(trained).save_pretrained(clean)
            tok.save_pretrained(str(clean))
            (clean / "README.md").write_text(f"# {repo}\n\nA tiny Llama-family model made for elmforest's examples.\n")
            commits[repo] = add_to_cache(clean, repo, "main", cache)

        model = new_model(preset_config("tiny", tok), seed=0)
        train(model, tok, stream(train_domains), cfg(base_steps), td / "base", Card(name="base", kind="seed"))
        publish(td / "base", "example/tiny-llama-base")
        for name, domain in FINE_TUNES.items():
            train(load_model(td / "base"), tok, stream([domain]), cfg(tune_steps), td / name,
                  Card(name=name, domain=domain))
            publish(td / name, f"example/tiny-llama-{name}")
    return commits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, help="Hub cache directory (default: HF_HUB_CACHE, HF_HOME/hub or ~/.cache)")
    args = ap.parse_args()
    for repo, commit in build(args.cache, quiet=False).items():
        print(f"{repo}@{commit[:12]}")


if __name__ == "__main__":
    main()
