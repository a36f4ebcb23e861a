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


def normalise_weights(weights: Sequence[float], what: str = "weights") -> tuple[np.ndarray, str | None]:
    """Non-negative, finite weights scaled to sum to 1; the note says if they were rescaled."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise BTMError(f"{what}: need at least one weight")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise BTMError(f"{what} must be finite and non-negative, got {w.tolist()}")
    s = w.sum()
    if s <= 0:
        raise BTMError(f"{what} sum to 0; at least one must be positive")
    note = None
    if abs(s - 1.0) > 1e-6:
        note = f"{what} summed to {s:.6g}; normalised to sum to 1"
    return w / s, note


def select_top_k(prior: Sequence[float], k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k largest prior weights (ties broken by order) and their renormalised
    weights. Experts with zero weight are never chosen."""
    p, _ = normalise_weights(prior, "prior")
    k = len(p) if k is None else k
    if k < 1:
        raise BTMError(f"top_k must be at least 1, got {k}")
    order = np.argsort(-p, kind="stable")
    chosen = [i for i in order[:k] if p[i] > 0]
    idx = np.array(chosen, dtype=np.int64)
    w = p[idx]
    return idx, w / w.sum()


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

    @property
    def k(self) -> int:
        return len(self.models)

    def expert_logprobs(self, blocks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        return torch.stack([token_logprobs(m, blocks, batch_size, self.device) for m in self.models])

    def token_logprobs(self, blocks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        return mix_logprobs(self.expert_logprobs(blocks, batch_size), self.log_prior)

    def perplexity(self, blocks: torch.Tensor, batch_size: int = 16) -> float:
        return math.exp(-self.token_logprobs(blocks, batch_size).double().mean().item())

    @torch.no_grad()
    def generate(
        self,
        prompt: str | torch.Tensor,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str | torch.Tensor:
        """Sample from the mixture, one token at a time, each expert with its own KV cache.
        A string prompt needs the tokenizer and returns text (prompt included); a tensor of
        ids returns ids."""
        as_text = isinstance(prompt, str)
        if as_text:
            if self.tokenizer is None:
                raise BTMError("generate() with a text prompt needs the ensemble's tokenizer")
            bos = self.tokenizer.bos_token_id
            ids = [bos] + self.tokenizer.encode(prompt, add_special_tokens=False)
            ids = torch.tensor([ids])
        else:
            ids = prompt.reshape(1, -1)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = ids.to(self.device)
        max_pos = min(getattr(m.config, "n_positions", None) or getattr(m.config, "max_position_embeddings", 1 << 30)
                      for m in self.models)
        # prefix log-likelihood of the prompt under each expert, and next-token log probs
        pasts, nxt, prefix = [], [], []
        for m in self.models:
            out = m(input_ids=ids, use_cache=True)
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
            prefix.append(lp[:-1].gather(-1, ids[0, 1:, None]).sum().double())
            nxt.append(lp[-1])
            pasts.append(out.past_key_values)
        prefix = torch.stack(prefix).cpu()
        for _ in range(max_new_tokens):
            if ids.shape[1] >= max_pos:
                break
            lp_next = torch.stack(nxt).cpu().double()  # (k, V)
            logw = self.log_prior + prefix
            logw = logw - torch.logsumexp(logw, 0)
            mix = torch.logsumexp(lp_next + logw[:, None], dim=0)
            tok = _sample(mix, temperature, top_p, gen)
            prefix = prefix + lp_next[:, tok]
            ids = torch.cat([ids, torch.tensor([[tok]], device=self.device)], dim=1)
            nxt = []
            for j, m in enumerate(self.models):
                out = m(input_ids=ids[:, -1:], past_key_values=pasts[j], use_cache=True)
                pasts[j] = out.past_key_values
                nxt.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1))
        if as_text:
            return self.tokenizer.decode(ids[0, 1:].tolist())
        return ids[0].cpu()



def _sample(logp: torch.Tensor, temperature: float, top_p: float, gen) -> int:
    if temperature <= 0:
        return int(torch.argmax(logp))
    probs = torch.softmax(logp / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.float(), 1, generator=gen))
