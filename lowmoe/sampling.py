"""Choosing the next token from logits: greedy, or temperature with top-k and top-p filtering."""

import numpy as np

from .errors import InputError


def check_params(temperature, top_p, top_k):
    if not temperature >= 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0, got {top_k}")


def sample(logits, temperature, top_p, top_k, rng):
    """logits f32[V] -> token id. temperature 0 is greedy (lowest id wins a tie)."""
    if temperature == 0:
        return int(np.argmax(logits))
    p = probabilities(logits, temperature, top_p, top_k)
    return int(rng.choice(len(p), p=p))


def probabilities(logits, temperature, top_p, top_k):
    """f64[V] sampling distribution: softmax(logits / temperature), then top-k, then top-p
    (keep the smallest set of most likely tokens whose mass reaches top_p), renormalised."""
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p
