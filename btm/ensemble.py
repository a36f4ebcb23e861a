"""The forest as an ensemble: a posterior-weighted mixture of experts, top-k sparse.

    p(x_t | x_<t) = sum_j p_j(x_t | x_<t) * w_j(t),   w_j(t) ∝ prior_j * p_j(x_<t)

Weights follow the cumulative likelihood of the whole prefix, and everything is mixed in
log space. Only the k experts with the largest cached prior are loaded and run, so the cost
is about k forward passes whatever the forest's size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from btm.errors import BTMError
from btm.posterior import token_logprobs
from btm.weights import select_top_k


def mix_logprobs(expert_lp: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Mixture log-probabilities of the targets. expert_lp: (k, N, T) per-expert token log
    probs; log_prior: (k,). Weights use the exclusive cumulative prefix log-likelihood."""
    lp = expert_lp.double()
    prefix = torch.cumsum(lp, dim=-1) - lp  # sum over s < t
    logw = log_prior.double()[:, None, None] + prefix
    logw = logw - torch.logsumexp(logw, dim=0, keepdim=True)
    return torch.logsumexp(lp + logw, dim=0).float()


class EnsembleLM:
    """A top-k mixture over loaded expert models.

    `experts` are loaded models (or directories, loaded here); `prior` has one weight per
    expert; only the top_k largest are kept and run.
    """

    def __init__(self, experts: Sequence, prior: Sequence[float], top_k: int | None = None,
                 names: Sequence[str] | None = None, tokenizer=None, device: str | None = None):
        from btm.family import load_model

        if len(experts) != len(prior):
            raise BTMError(f"{len(experts)} experts but {len(prior)} prior weights")
        idx, w = select_top_k(prior, top_k)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.names = [names[i] if names else str(i) for i in idx]
        self.weights = w
        self.models = [
            load_model(experts[i], self.device) if isinstance(experts[i], (str, os.PathLike)) else experts[i]
            for i in idx
        ]
        self.log_prior = torch.tensor(np.log(w), dtype=torch.float64)
        self.tokenizer = tokenizer
        self._hf = None

    @property
    def k(self) -> int:
        return len(self.models)

    def expert_logprobs(self, blocks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        return torch.stack([token_logprobs(m, blocks, batch_size, self.device) for m in self.models])

    def token_logprobs(self, blocks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        return mix_logprobs(self.expert_logprobs(blocks, batch_size), self.log_prior)

    def perplexity(self, blocks: torch.Tensor, batch_size: int = 16) -> float:
        return math.exp(-self.token_logprobs(blocks, batch_size).double().mean().item())

    def as_transformers_model(self):
        """These experts and weights as a transformers model (generate(), pipelines, lm-eval)."""
        from btm.forest_model import ForestForCausalLM

        if self._hf is None:
            self._hf = ForestForCausalLM.from_experts(self.models, self.weights.tolist(), names=self.names)
        return self._hf

    @torch.no_grad()
    def generate(self, prompt: str | Sequence[str] | torch.Tensor, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, **generate_kwargs) -> str | list[str] | torch.Tensor:
        """Continue a prompt (text, a list of texts decoded as one left-padded batch, or a tensor of
        ids) with the mixture, through transformers' generate(): temperature 0 is greedy; any other
        generate() option passes through (top_k, repetition_penalty, stop_strings, ...). Every
        text prompt starts with the token that starts a document in training (BOS, or EOS for
        tokenizers without one); prompts longer than the context keep their last tokens."""
        model = self.as_transformers_model()
        room = max(1, (_max_positions(self.models) or 1 << 30) - max_new_tokens)
        if isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(1, -1)[:, -room:].to(self.device)
            mask = torch.ones_like(ids)
            pad = 0
        else:
            if self.tokenizer is None:
                raise BTMError("generate() with a text prompt needs the ensemble's tokenizer")
            from btm.tokenizer import bos_id

            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            start = bos_id(self.tokenizer)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else start
            rows = [([start] + self.tokenizer.encode(t, add_special_tokens=False))[-room:] for t in texts]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, attention_mask=mask, pad_token_id=pad)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=None)
        if generate_kwargs.get("stop_strings") and self.tokenizer is not None:
            kw["tokenizer"] = self.tokenizer
        kw.update(generate_kwargs)
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(ids, **kw)
        if isinstance(prompt, torch.Tensor):
            return out[0].cpu()
        # each row: its padding, its start token, the prompt, the continuation up to its first end
        # of text (a finished row is padded on to the batch's length); prompt and continuation returned
        # and, with stop strings, up to the first of them (left out, as lm-eval and most APIs do)
        eos, stops = self.tokenizer.eos_token_id, kw.get("stop_strings") or []
        stops = [stops] if isinstance(stops, str) else stops
        texts = []
        for row, m in zip(out.tolist(), mask, strict=True):
            cont = row[width:]
            if eos in cont:
                cont = cont[:cont.index(eos)]
            cont = self.tokenizer.decode(cont)
            cut = min([i for i in (cont.find(s) for s in stops) if i >= 0], default=len(cont))
            first = width - int(m.sum())
            first += row[first] == start  # the start token (a prompt cut to the context lost it)
            texts.append(self.tokenizer.decode(row[first:width]) + cont[:cut])
        return texts[0] if isinstance(prompt, str) else texts


def _max_positions(models) -> int | None:
    from btm.forest_model import max_positions

    vals = [max_positions(m.config) for m in models]
    vals = [v for v in vals if v]
    return min(vals) if vals else None
