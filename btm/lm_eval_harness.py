"""A forest as an lm-evaluation-harness model:

    lm_eval --model elmforest --model_args forest=DIR,top_k=2,target=FILE --tasks ...

It is lm-eval's own Hugging Face model (HFLM) driving the forest's ensemble as a transformers
model (btm.forest_model), so loglikelihood, loglikelihood_rolling and generate_until are
lm-eval's, unchanged. Installing elmforest registers the name (see elmforest_lm_eval_hook).
"""

from __future__ import annotations

from lm_eval.models.huggingface import HFLM


class ElmforestLM(HFLM):
    """model_args: forest=DIR (a forest directory), top_k=K (experts to run; default all),
    target=FILE (text of the target domain for the cached prior; default uniform), plus any
    HFLM argument (batch_size, max_length, device...)."""

    def __init__(self, forest: str, top_k: int | str | None = None, target: str | None = None,
                 device: str | None = None, **kwargs):
        import torch

        from btm.forest import Forest
        from btm.forest_model import ForestForCausalLM
        from btm.tokenizer import load_tokenizer

        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # as lm-eval's hf model does (its default is cuda:0)
        f = Forest.load(forest)
        model = ForestForCausalLM.from_forest(f, top_k=int(top_k) if top_k not in (None, "", "None") else None,
                                              target=target or None, device=device)
        kwargs.pop("pretrained", None)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=model, tokenizer=load_tokenizer(f.seed_dir), backend="causal", device=device,
                         **kwargs)
