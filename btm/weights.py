"""Mixture weights, shared by the ensemble and the averages: checked and normalised, and the
top-k of a prior."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import BTMError  # relative: an exported forest ships this file as remote code


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
