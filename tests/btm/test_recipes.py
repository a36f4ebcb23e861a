"""btm.recipes.train_elm, the one recipe of an ELM's training (the CLI's `train`, the demo and
the Flower ClientApp call it), and the lock every model load takes."""

from __future__ import annotations

import threading

from helpers import CORPUS, tiny_train_config


def test_train_elm_card_names_its_init_domain_and_data(tmp_path, seed_dir, tok, cache_dir):
    from btm.branch import branch_from_model
    from btm.data import tokenize_file
    from btm.family import read_card
    from btm.recipes import train_elm

    init = tmp_path / "init"
    branch_from_model(seed_dir, init, "python", carry_optimizer=True)
    source = CORPUS / "python" / "train.jsonl"
    out = train_elm(init, tmp_path / "elm", [source], tiny_train_config(3), domain="python", name="py",
                    data={"domain": "python", "federated_round": 2}, cache_dir=cache_dir)
    card = read_card(out)
    assert (card.name, card.kind, card.domain) == ("py", "elm", "python")
    assert card.parents == read_card(init).parents and card.parents[0]["name"] == "seed"
    assert card.data == {"domain": "python", "federated_round": 2,
                         "tokens": int(tokenize_file(source, tok, cache_dir).size)}
    assert card.training["updates"] == 3


def test_every_model_load_holds_the_loading_lock(seed_dir, monkeypatch):
    """Threads of one process (in-process Flower nodes) may load models at once; transformers'
    from_pretrained is not thread-safe, so btm.family.load_model runs it under one lock."""
    from btm import family

    seen = []
    original = family.AutoModelForCausalLM.from_pretrained

    def recording(*a, **kw):
        seen.append(family._LOADING.locked())
        return original(*a, **kw)

    monkeypatch.setattr(family.AutoModelForCausalLM, "from_pretrained", recording)
    models = []
    threads = [threading.Thread(target=lambda: models.append(family.load_model(seed_dir))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True, True, True] and len(models) == 3
    assert not family._LOADING.locked()
