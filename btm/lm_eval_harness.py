"""A forest as an lm-evaluation-harness model:

    elmforest lm-eval --model elmforest --model_args forest=DIR,top_k=2[,router=prompt|centroid|prior][,target=FILE] ...

`elmforest lm-eval` is lm-eval's own command line, every argument passed on unchanged, with
the `elmforest` model registered first (lm-eval reads no plugin entry points). An exported
forest needs none of this: `lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True`.

It is lm-eval's own Hugging Face model (HFLM) driving the forest's ensemble as a transformers
model (btm.forest_model), so loglikelihood, loglikelihood_rolling and generate_until are
lm-eval's, with the forest's routing (btm.routing) where no target is given:

- loglikelihood: each request's experts are chosen from its context alone (the continuation
  being scored never changes them), then the requests that chose the same experts are scored
  together with those experts;
- loglikelihood_rolling: the experts of each position are chosen from the text before it;
- generate_until: each request is routed on its own prompt.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence

from lm_eval.models.huggingface import HFLM

MODEL_NAME = "elmforest"


def register() -> None:
    """Make `elmforest` a model name lm-eval knows (in this process)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"{__name__}:ElmforestLM")


def run_cli(args: Sequence[str]) -> None:
    """lm-eval's command line with `args`, the elmforest model registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


class ElmforestLM(HFLM):
    """model_args: forest=DIR (a forest directory), top_k=K (experts to run; default all),
    router=prompt|centroid|prior (default: prior with a target, else centroid where the forest
    has routing vectors, else prompt), target=FILE (text of the target domain for a cached
    prior), plus any HFLM argument (batch_size, max_length, device...)."""

    def __init__(self, forest: str, top_k: int | str | None = None, target: str | None = None,
                 router: str | None = None, device: str | None = None, **kwargs):
        import torch

        from btm.forest import Forest
        from btm.forest_model import ForestForCausalLM
        from btm.tokenizer import load_tokenizer

        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # as lm-eval's hf model does (its default is cuda:0)
        f = Forest.load(forest)
        model = ForestForCausalLM.from_forest(f, top_k=int(top_k) if top_k not in (None, "", "None") else None,
                                              target=target or None, device=device, router=router or None)
        kwargs.pop("pretrained", None)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=model, tokenizer=load_tokenizer(f.seed_dir), backend="causal", device=device,
                         **kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        forest = self.model
        if not forest.routed:
            return super().loglikelihood(requests, disable_tqdm)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[self._route_context(req.args[0], req.args[1])].append(i)
        out: list = [None] * len(requests)
        for experts, idx in groups.items():
            with forest.fixed_experts(experts):
                scored = super().loglikelihood([requests[i] for i in idx], disable_tqdm=True)
            for i, r in zip(idx, scored, strict=True):
                out[i] = r
        return out

    def _route_context(self, context: str, continuation: str) -> tuple[int, ...]:
        """The experts a request's context chooses, from the context's tokens as lm-eval feeds
        them (an empty context is lm-eval's prefix token alone)."""
        import torch

        if context == "":
            ctx = [self.prefix_token_id]
        else:
            ctx, _ = self._encode_pair(context, continuation)
        ids = torch.tensor([ctx[-self.max_length:]], device=self.device)
        return tuple(int(j) for j in self.model.route(ids)[0])
