"""The forest as an ensemble: a posterior-weighted mixture of experts, top-k sparse.

    p(x_t | x_<t) = sum_j p_j(x_t | x_<t) * w_j(t),   w_j(t) ∝ prior_j * p_j(x_<t)

Weights follow the cumulative likelihood of the whole prefix, and everything is mixed in
log space. Which k experts run is chosen per text by a router (btm.routing): the top-k of a
cached prior, the prompt's posterior over every ELM, or its distance to each ELM's routing
vector. With the prior router only those k are loaded; a forward pass costs about k passes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from btm.errors import BTMError
from btm.routing import routed_mix


def mix_logprobs(expert_lp: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Mixture log-probabilities of the targets. expert_lp: (k, N, T) per-expert token log
    probs; log_prior: (k,). Weights use the exclusive cumulative prefix log-likelihood."""
    return routed_mix(expert_lp, log_prior)


class EnsembleLM:
    """A top-k mixture over expert models, as a library object.

    `experts` are loaded models or directories; `prior` is the forest's prior over them
    (default uniform). `router` says which k run for each text (btm.routing): `prior` (the
    top-k of the prior, the same for every text: a cached prior from a target file), `prompt`
    (the text's posterior over all n) or `centroid` (one seed pass against each expert's
    routing vector; needs `routing_vectors` and `seed`). The default is `prior` when a prior
    is given and `prompt` when none is, so equal weights never quietly pick the first k.
    """

    def __init__(self, experts: Sequence, prior: Sequence[float] | None = None, top_k: int | None = None,
                 names: Sequence[str] | None = None, tokenizer=None, device: str | None = None,
                 router: str | None = None, routing_vectors: Sequence[Sequence[float]] | None = None,
                 seed=None):
        from btm.forest_model import ForestForCausalLM

        router = router or ("prior" if prior is not None else "prompt")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = ForestForCausalLM.from_experts(experts, prior, top_k, names=_names(experts, names),
                                                     device=self.device, router=router,
                                                     routing_vectors=routing_vectors, seed=seed)
        self.tokenizer = tokenizer

    @property
    def router(self) -> str:
        return self.model.router

    @property
    def names(self) -> list[str]:
        """The experts held: the chosen k with the prior router, every expert with the others."""
        return list(self.model.config.names)

    @property
    def weights(self) -> np.ndarray:
        return np.exp(self.model.log_prior.cpu().numpy())

    @property
    def models(self) -> list:
        return list(self.model.experts)

    @property
    def k(self) -> int:
        return self.model.k

    @property
    def last_routes(self):
        """Each sequence's experts and routing weights, from the last prompts generated."""
        return self.model.routes

    def as_transformers_model(self):
        """These experts, weights and router as a transformers model (generate(), pipelines, lm-eval)."""
        return self.model

    @torch.no_grad()
    def token_logprobs(self, blocks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """log p(x_t | x_<t) of every target of every block (N, T), the experts of each position
        chosen from the text before it. `blocks` is (N, T+1)."""
        out = torch.empty(blocks.shape[0], blocks.shape[1] - 1, dtype=torch.float32)
        for i in range(0, blocks.shape[0], batch_size):
            b = blocks[i: i + batch_size].to(self.device)
            lp = torch.log_softmax(self.model(input_ids=b[:, :-1], use_cache=False).logits.float(), dim=-1)
            out[i: i + batch_size] = lp.gather(-1, b[:, 1:, None]).squeeze(-1).cpu()
        return out

    def perplexity(self, blocks: torch.Tensor, batch_size: int = 16) -> float:
        return math.exp(-self.token_logprobs(blocks, batch_size).double().mean().item())

    @torch.no_grad()
    def route(self, prompts: str | Sequence[str]) -> list:
        """The experts each prompt would run and their routing weights (no text is generated)."""
        ids, mask, _, _ = self._encode([prompts] if isinstance(prompts, str) else list(prompts), 1)
        self.model.route(ids, mask)
        return self.model.routes

    @torch.no_grad()
    def generate(self, prompt: str | Sequence[str] | torch.Tensor, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, reroute_every: int | None = None,
                 **generate_kwargs) -> str | list[str] | torch.Tensor:
        """Continue a prompt (text, a list of texts decoded as one left-padded batch, or a tensor of
        ids) with the mixture, through transformers' generate(): temperature 0 is greedy; any other
        generate() option passes through (top_k, repetition_penalty, stop_strings, ...). Each
        prompt runs the experts its router chooses (`last_routes` says which); with
        `reroute_every` m, they are chosen again from the text so far every m new tokens. Every
        text prompt starts with the token that starts a document in training (BOS, or EOS for
        tokenizers without one); prompts longer than the context keep their last tokens."""
        if seed is not None:
            torch.manual_seed(seed)
        kw = dict(do_sample=temperature > 0)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=None)
        if generate_kwargs.get("stop_strings") and self.tokenizer is not None:
            kw["tokenizer"] = self.tokenizer
        kw.update(generate_kwargs)
        if isinstance(prompt, torch.Tensor):
            room = self._room(max_new_tokens)
            ids = prompt.reshape(1, -1)[:, -room:].to(self.device)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                                      max_new_tokens=max_new_tokens, **kw)
            return out[0].cpu()
        if self.tokenizer is None:
            raise BTMError("generate() with a text prompt needs the ensemble's tokenizer")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = self._generate_rows(texts, max_new_tokens, reroute_every, kw)
        out = [self._decode(r, kw.get("stop_strings")) for r in rows]
        return out[0] if isinstance(prompt, str) else out

    # ------------------------------------------------------------------ generation steps

    def _room(self, max_new_tokens: int) -> int:
        return max(1, (_max_positions(self.models) or 1 << 30) - max_new_tokens)

    def _encode(self, texts: list[str], max_new_tokens: int):
        """Left-padded ids and mask of the prompts, each led by the start-of-document token."""
        from btm.tokenizer import bos_id

        start = bos_id(self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else start
        room = self._room(max_new_tokens)
        rows = [([start] + self.tokenizer.encode(t, add_special_tokens=False))[-room:] for t in texts]
        return (*_left_pad(rows, pad, self.device), pad, start)

    def _generate_rows(self, texts: list[str], max_new_tokens: int, reroute_every: int | None,
                       kw: dict) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, continuation ids) per text. With `reroute_every`, generation goes in
        chunks of that many tokens, each prompted with the text so far (so routed again);
        a row that ended leaves the batch."""
        ids, mask, pad, start = self._encode(texts, max_new_tokens)
        prompts = [row[len(row) - int(m.sum()):] for row, m in zip(ids.tolist(), mask, strict=True)]
        conts: list[list[int]] = [[] for _ in texts]
        routes: list = [None] * len(texts)
        live = list(range(len(texts))) if max_new_tokens > 0 else []
        chunk = reroute_every or max_new_tokens
        eos = self.tokenizer.eos_token_id
        while live:
            room = self._room(0)
            ids, mask = _left_pad([(prompts[i] + conts[i])[-room:] for i in live], pad, self.device)
            left = max_new_tokens - len(conts[live[0]])
            out = self.model.generate(ids, attention_mask=mask, pad_token_id=pad,
                                      max_new_tokens=min(chunk, left), **kw)
            for r, i in enumerate(live):
                conts[i] += out[r, ids.shape[1]:].tolist()
                routes[i] = self.model.routes[r]
            if out.shape[1] == ids.shape[1]:  # nothing more was generated
                break
            live = [i for i in live if len(conts[i]) < max_new_tokens and eos not in conts[i]
                    and not _stopped(self.tokenizer, conts[i], kw.get("stop_strings"))]
        self.model.routes = routes
        return list(zip(prompts, conts, strict=True))

    def _decode(self, row: tuple[list[int], list[int]], stops) -> str:
        """The prompt (without its start token) and the continuation up to its first end of text
        and, with stop strings, up to the first of them (left out, as lm-eval and most APIs do)."""
        from btm.tokenizer import bos_id

        prompt, cont = row
        eos = self.tokenizer.eos_token_id
        if eos in cont:
            cont = cont[:cont.index(eos)]
        text = self.tokenizer.decode(cont)
        stops = [stops] if isinstance(stops, str) else (stops or [])
        cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
        first = 1 if prompt and prompt[0] == bos_id(self.tokenizer) else 0  # a prompt cut to the context lost it
        return self.tokenizer.decode(prompt[first:]) + text[:cut]


def _names(experts: Sequence, names: Sequence[str] | None) -> list[str]:
    if names:
        return list(names)
    return [Path(e).name if isinstance(e, (str, os.PathLike)) else str(i) for i, e in enumerate(experts)]


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _stopped(tokenizer, cont: list[int], stops) -> bool:
    if not stops:
        return False
    text = tokenizer.decode(cont)
    return any(s in text for s in ([stops] if isinstance(stops, str) else stops))


def _max_positions(models) -> int | None:
    from btm.model_files import max_positions

    vals = [max_positions(m.config) for m in models]
    vals = [v for v in vals if v]
    return min(vals) if vals else None
