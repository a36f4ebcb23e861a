"""Domain likelihoods, the domain posterior and the cached prior.

    log p(x | D=j)      = sum_t log p_j(x_t | x_<t)                       (per sequence block)
    log p(D=j | x)      = log p(x|D=j) + log p(D=j) - logsumexp_j'(...)    (Bayes, in log space)
    cached prior        = EMA (alpha 0.3, pandas ewm(adjust=False)) over per-batch mean
                          posteriors of N development blocks of the target domain; each batch's
                          posterior uses the EMA so far as its prior (uniform at the start).

Scoring streams ELMs one at a time (memory of one model) unless the caller passes models
that are already loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from btm.errors import DataError

EMA_ALPHA = 0.3


@torch.no_grad()
def token_logprobs(model, blocks: torch.Tensor, batch_size: int = 16, device=None) -> torch.Tensor:
    """log p(x_t | x_<t) of every target token of every block: shape (N, T), float32, on CPU.
    `blocks` is (N, T+1): inputs are blocks[:, :-1], targets blocks[:, 1:]."""
    device = device or next(model.parameters()).device
    out = torch.empty(blocks.shape[0], blocks.shape[1] - 1, dtype=torch.float32)
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i : i + batch_size].to(device)
        with _autocast(device):
            logits = model(input_ids=b[:, :-1], use_cache=False).logits
        logits = logits.float()
        # log p(target) = logit(target) - logsumexp(logits): no full log-softmax copy of the logits
        tgt = logits.gather(-1, b[:, 1:, None]).squeeze(-1)
        out[i : i + batch_size] = (tgt - torch.logsumexp(logits, dim=-1)).cpu()
    return out


def _autocast(device):
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def log_posterior(loglik: np.ndarray | torch.Tensor, log_prior: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bayes' rule in log space. loglik: (N, n) per-sequence log-likelihoods under n
    experts; log_prior: (n,). Returns (N, n) log posteriors (each row sums to 1 in prob)."""
    ll = np.asarray(loglik, dtype=np.float64)
    lp = np.asarray(log_prior, dtype=np.float64)
    joint = ll + lp[None, :]
    m = joint.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return joint - (m + np.log(np.exp(joint - m).sum(axis=1, keepdims=True)))


def cached_prior(
    loglik: np.ndarray | torch.Tensor, batch_size: int = 16, alpha: float = EMA_ALPHA
) -> np.ndarray:
    """The cached prior from (N, n) per-sequence log-likelihoods, in the order seen."""
    ll = np.asarray(loglik, dtype=np.float64)
    if ll.ndim != 2 or ll.shape[0] == 0:
        raise DataError("the domain sample is empty: need at least one block of text to compute a posterior")
    n = ll.shape[1]
    ema = None
    prior = np.full(n, 1.0 / n)
    for i in range(0, ll.shape[0], batch_size):
        with np.errstate(divide="ignore"):
            post = np.exp(log_posterior(ll[i : i + batch_size], np.log(prior)))
        m = post.mean(axis=0)
        ema = m if ema is None else (1 - alpha) * ema + alpha * m
        prior = ema
    return ema / ema.sum()


def sequence_logliks(
    models: Sequence, blocks: torch.Tensor, batch_size: int = 16, device: str | None = None
) -> np.ndarray:
    """(N, n) log p(block | D=j). `models` are loaded models or model directories; a
    directory is loaded, scored and released before the next (memory of one model)."""
    from btm.family import reuse_or_load

    cols = []
    shell = None  # one model object, refilled with each ELM's weights in turn
    for m in models:
        if isinstance(m, (str, os.PathLike)):
            shell = reuse_or_load(shell, m, device or _default_device())
            model = shell
        else:
            model = m
        cols.append(token_logprobs(model, blocks, batch_size).double().sum(dim=1).numpy())
    return np.stack(cols, axis=1)


def domain_prior(
    models: Sequence, blocks: torch.Tensor, batch_size: int = 16, device: str | None = None
) -> np.ndarray:
    """The cached prior of a domain sample over `models` (one weight per model, sums to 1)."""
    if blocks.shape[0] == 0:
        raise DataError("the domain sample is empty: need at least one block of text")
    return cached_prior(sequence_logliks(models, blocks, batch_size, device), batch_size)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
