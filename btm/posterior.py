"""Domain likelihoods, the domain posterior and the cached prior.

    log p(x | D=j)      = sum_t log p_j(x_t | x_<t)                       (per sequence block)
    log p(D=j | x)      = log p(x|D=j) + log p(D=j) - logsumexp_j'(...)    (Bayes, in log space)
    cached prior        = EMA (alpha 0.3, pandas ewm(adjust=False)) over the mean posteriors
                          of groups of 2 sequences, in order, of the first N=100 development
                          blocks of the target domain; each group's posterior uses the EMA so
                          far as its prior (uniform at the start).

The EMA's groups are their own setting, never the forward batch size, so a batch size chosen
for memory does not change the prior; and every log-probability behind a posterior (the
forward pass, the head, the logsumexp) is fp32 on every device, so a GPU ranks experts as a
CPU does. Scoring streams ELMs one at a time (memory of one model) unless the caller passes
models that are already loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from btm.errors import DataError

EMA_ALPHA = 0.3
EMA_GROUP = 2  # sequences per EMA step
PRIOR_BLOCKS = 100  # development blocks behind a cached prior


@torch.no_grad()
def token_logprobs(model, blocks: torch.Tensor, batch_size: int = 16, device=None) -> torch.Tensor:
    """log p(x_t | x_<t) of every target token of every block: shape (N, T), float32, on CPU.
    `blocks` is (N, T+1): inputs are blocks[:, :-1], targets blocks[:, 1:]."""
    device = device or next(model.parameters()).device
    out = torch.empty(blocks.shape[0], blocks.shape[1] - 1, dtype=torch.float32)
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i : i + batch_size].to(device)
        # no autocast: bf16 logits move a 512-token log-likelihood by up to ~0.8 nats
        logits = model(input_ids=b[:, :-1], use_cache=False).logits.float()
        # log p(target) = logit(target) - logsumexp(logits): no full log-softmax copy of the logits
        tgt = logits.gather(-1, b[:, 1:, None]).squeeze(-1)
        out[i : i + batch_size] = (tgt - torch.logsumexp(logits, dim=-1)).cpu()
    return out


def log_posterior(loglik: np.ndarray | torch.Tensor, log_prior: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bayes' rule in log space. loglik: (N, n) per-sequence log-likelihoods under n
    experts; log_prior: (n,). Returns (N, n) log posteriors (each row sums to 1 in prob)."""
    ll = np.asarray(loglik, dtype=np.float64)
    lp = np.asarray(log_prior, dtype=np.float64)
    joint = ll + lp[None, :]
    m = joint.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return joint - (m + np.log(np.exp(joint - m).sum(axis=1, keepdims=True)))


def cached_prior(loglik: np.ndarray | torch.Tensor, group: int = EMA_GROUP, alpha: float = EMA_ALPHA) -> np.ndarray:
    """The cached prior from (N, n) per-sequence log-likelihoods, in the order seen: an EMA
    over the mean posteriors of consecutive groups of `group` sequences."""
    ll = np.asarray(loglik, dtype=np.float64)
    if ll.ndim != 2 or ll.shape[0] == 0:
        raise DataError("the domain sample is empty: need at least one block of text to compute a posterior")
    n = ll.shape[1]
    ema = None
    prior = np.full(n, 1.0 / n)
    for i in range(0, ll.shape[0], group):
        with np.errstate(divide="ignore"):
            post = np.exp(log_posterior(ll[i : i + group], np.log(prior)))
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


def domain_prior(models: Sequence, blocks: torch.Tensor, batch_size: int = 16, device: str | None = None,
                 max_blocks: int | None = None, group: int = EMA_GROUP) -> np.ndarray:
    """The cached prior of a domain sample over `models` (one weight per model, sums to 1),
    from its first `max_blocks` blocks (callers sample PRIOR_BLOCKS by default).
    `batch_size` is only how many blocks go through a forward pass at once."""
    if blocks.shape[0] == 0:
        raise DataError("the domain sample is empty: need at least one block of text")
    return cached_prior(sequence_logliks(models, blocks[:max_blocks], batch_size, device), group)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
