"""Choosing the experts from the text itself: no target file needed.

A router scores every ELM of the forest for a text; the k best-scored ELMs run, and the
mixture among them is Bayes as always, w_j(t) ∝ prior_j · p_j(x_<t), with the forest's prior
renormalised over the chosen k. Routers differ only in the score:

    prior     the forest's prior alone (e.g. the cached prior of a target file): the same k
              experts for every text
    prompt    exact: log prior_j + log p_j(text), the text's domain posterior over all n ELMs
              (n forward passes over the text)
    centroid  cheap (c-BTM): one vector per ELM, the seed's mean hidden state over the ELM's
              domain sample, fixed when the ELM joins the forest; the text's own mean seed
              hidden state is compared with each, score log prior_j - |v - c_j|^2 / T on
              centred, unit-length vectors (T = 0.1): one seed pass, whatever n

Ties break in forest order (a stable sort): equal scores choose the ELMs added first.

Where the text is one prompt (generate(), an lm-eval context) the choice is made once from the
whole prompt; where a text is scored (perplexity, rolling log-likelihood), the experts of each
position are chosen from the text before that position, never from the token being scored.
With k = n every ELM runs and the result is the full ensemble, whatever the router.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from .errors import (  # relative: an exported forest ships this file as remote code
    BTMError,
    ForestError,
)

ROUTERS = ("prompt", "centroid", "prior")
TEMPERATURE = 0.1  # c-BTM's softmax temperature on squared distances between unit vectors
VECTOR_BLOCKS = 100  # domain-sample blocks behind an ELM's routing vector (as behind a cached prior)
VECTORS_HOWTO = "elmforest forest vectors FOREST --corpus DIR (or --sample NAME=FILE)"


def check_router(router: str) -> str:
    if router not in ROUTERS:
        raise BTMError(f"unknown router {router!r}; routers: {', '.join(ROUTERS)}")
    return router


def choose(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices (..., k) of the k largest scores along the last axis, ties in forest order,
    returned in forest order (so that k = n is every ELM in the forest's own order)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def chosen_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask shaped like `scores` marking each row's k chosen experts."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, choose(scores, k), True)


def log_weights(log_prior: torch.Tensor, prefix: torch.Tensor, chosen: torch.Tensor | None = None) -> torch.Tensor:
    """The mixture's log-weights (n, ...) among the chosen experts: log prior_j + log p_j(x_<t),
    normalised over the chosen (the others get -inf). log_prior: (n,) or (n, B); prefix and
    chosen: (n, ...)."""
    lp = log_prior.double()
    logw = lp.reshape(lp.shape + (1,) * (prefix.dim() - lp.dim())) + prefix.double()
    if chosen is not None:
        logw = logw.masked_fill(~chosen, float("-inf"))
    return logw - torch.logsumexp(logw, dim=0, keepdim=True)


def routed_mix(expert_lp: torch.Tensor, log_prior: torch.Tensor, k: int | None = None,
               scores: torch.Tensor | None = None) -> torch.Tensor:
    """Mixture log-probabilities of the targets (N, T) with the experts of each position chosen
    from the text before it. expert_lp: (n, N, T) every ELM's token log-probs; log_prior: (n,);
    scores: (n, N, T) each position's routing scores (default: the prompt router's,
    log prior + log p_j(x_<t)). k = None or n is the full ensemble."""
    lp = expert_lp.double()
    prefix = torch.cumsum(lp, dim=-1) - lp  # log p_j(x_<t): the text before each target
    chosen = None
    if k is not None and k < lp.shape[0]:
        if scores is None:
            scores = log_prior.double()[:, None, None] + prefix
        chosen = chosen_mask(scores.movedim(0, -1), k).movedim(-1, 0)
    return torch.logsumexp(lp + log_weights(log_prior, prefix, chosen), dim=0).float()


# ---------------------------------------------------------------------------- centroid vectors

@torch.no_grad()
def hidden_states(seed: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """The seed's last hidden state at every position: (B, T, d), float32."""
    import inspect

    device = next(seed.parameters()).device
    extra = {}
    if positions is not None and "position_ids" in inspect.signature(seed.forward).parameters:
        extra["position_ids"] = positions.to(device)
    out = seed(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
               output_hidden_states=True, use_cache=False, **extra)
    return out.hidden_states[-1].float().cpu()


def text_vectors(seed: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each text's mean seed hidden state over its real (unpadded) tokens but the first: (B, d).
    The first token has no context (a start-of-document token, in a prompt), so it says
    nothing of the domain; a text of one token keeps it."""
    m = torch.ones(ids.shape, dtype=torch.float32) if mask is None else mask.float().cpu()
    positions = (m.cumsum(-1) - 1).clamp_min(0).long()  # left padding: real tokens from 0
    h = hidden_states(seed, ids, mask, positions)
    first = (m.cumsum(-1) == 1) & (m.sum(-1, keepdim=True) > 1)
    m = m * ~first
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)


def prefix_vectors(seed: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """At each position t, the mean seed hidden state of positions 1..t (the text before the
    token at t + 1, its first token left out as in text_vectors): (B, T, d)."""
    h = hidden_states(seed, ids)
    tail = h[:, 1:].cumsum(1) / torch.arange(1, h.shape[1], dtype=h.dtype)[None, :, None]
    return torch.cat([h[:, :1], tail], dim=1)


@torch.no_grad()
def domain_vector(seed: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """An ELM's routing vector: the seed's mean hidden state over its domain sample (blocks)."""
    if blocks.shape[0] == 0:
        raise BTMError("a routing vector needs at least one block of the domain's text")
    total, count = None, 0
    for i in range(0, blocks.shape[0], batch_size):
        h = hidden_states(seed, blocks[i: i + batch_size]).double()
        h = h[:, 1:] if h.shape[1] > 1 else h  # as text_vectors: the first token has no context
        s = h.sum((0, 1))
        total = s if total is None else total + s
        count += h.shape[0] * h.shape[1]
    return (total / count).float().numpy()


def check_vector(vector: Sequence[float], size: int, what: str = "routing vector") -> list[float]:
    """A routing vector as a list of floats, refused unless it has `size` finite numbers."""
    try:
        v = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError):
        raise BTMError(f"{what}: a list of {size} numbers, got something else") from None
    if v.ndim != 1 or v.size != size:
        raise BTMError(f"{what}: {v.size} numbers for a seed of hidden size {size}; compute it with this forest's "
                       "seed (`elmforest branch request` does)")
    if not np.all(np.isfinite(v)):
        raise BTMError(f"{what}: holds NaN or infinite values; compute it again")
    return [float(x) for x in v]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Centroids:
    """The ELMs' routing vectors, centred on their mean and scaled to unit length, as
    c-BTM's cluster centres; a text's vector is centred and scaled the same way."""

    def __init__(self, vectors: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
                 temperature: float = TEMPERATURE):
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if v.dim() != 2 or v.shape[0] == 0 or not torch.isfinite(v).all():
            raise ForestError("routing vectors: need one finite vector per ELM")
        self.mean = v.mean(0)
        self.centres = _unit(v - self.mean)
        self.temperature = temperature

    @property
    def size(self) -> int:
        return int(self.centres.shape[1])

    def scores(self, vectors: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        """(..., n) log prior_j - |unit(v - mean) - c_j|^2 / T for text vectors (..., d)."""
        q = _unit(vectors.float() - self.mean)
        d2 = ((q[..., None, :] - self.centres) ** 2).sum(-1)
        return log_prior.double() - d2.double() / self.temperature


def forest_vectors(manifest: dict) -> list[list[float]] | None:
    """Every ELM's routing vector from a forest manifest, or None if any ELM lacks one."""
    vecs = [e.get("routing_vector") for e in manifest.get("elms", [])]
    return vecs if vecs and all(v is not None for v in vecs) else None


def missing_vectors_note(root: str | os.PathLike) -> str:
    return (f"{root}: some ELMs have no routing vector (the forest was made before routing), so the centroid router "
            f"is unavailable and the prompt router is used; compute them with `{VECTORS_HOWTO.replace('FOREST', str(root))}`")


def uniform_log_prior(n: int) -> torch.Tensor:
    return torch.full((n,), -math.log(n), dtype=torch.float64)
