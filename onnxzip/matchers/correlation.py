"""From feature covariance to the correlation matrix the matchers work on.

ZipIt! (Stoica et al., ICLR 2024, Sec. 4.3) matches features by the correlation of their
activations over calibration data: C = cov / outer(std, std), with the denominator clamped
(at 1e-7, as the authors' code does) so that near-dead features get correlations near 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["correlation_from_covariance", "check_correlation", "EPS"]

#: Clamp of the denominator outer(std, std) (the authors' value).
EPS = 1e-7


def correlation_from_covariance(cov, eps: float = EPS) -> np.ndarray:
    """Correlation matrix (float64) of a covariance matrix.

    ``C[i, j] = cov[i, j] / max(std_i * std_j, eps * max_k var_k)`` (a clamp relative to the
    largest variance, so scaling every feature leaves the result unchanged); where feature i or
    j has a variance under that clamp (near-dead), the true correlation times
    ``min(var_i, var_j) / (eps * max_k var_k)`` instead, so that a near-dead feature's exact copy
    stays its most similar feature (the product clamp ranks such pairs by covariance). A feature with zero
    (or, from rounding, negative or negligible) variance -- a dead or constant channel -- gets
    correlation 0 with everything,
    itself included, so the result never contains NaN. The diagonal is otherwise left as
    computed (about 1); each matcher decides what to do with it.
    """
    cov = np.array(cov, dtype=np.float64, copy=True)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be a square matrix, got shape {cov.shape}")
    if not np.all(np.isfinite(cov)):
        bad = np.argwhere(~np.isfinite(cov))[0]
        raise ValueError(
            f"covariance contains {cov[tuple(bad)]} at {tuple(int(b) for b in bad)}: "
            "the statistics are invalid; check the calibration data and activations for NaN/inf"
        )
    var = np.diagonal(cov).copy()
    # the clamp is relative to the largest variance, so that correlations do not depend on the
    # features' scale (small-scale features are common, e.g. after pooling)
    top = float(var.max()) if var.size and var.max() > 0 else 0.0
    dead = ~(var > eps * top * 1e-6) if top > 0 else np.ones(var.shape, dtype=bool)
    std = np.sqrt(np.where(dead, 0.0, var))
    floor = eps * top if top > 0 else eps
    denom = np.maximum(np.outer(std, std), floor)
    corr = cov / denom
    # near-dead features (variance under the clamp): their correlation is damped by the smaller
    # of the two variances, not by their product, so that no feature is ever more similar to a
    # near-dead feature than that feature's exact copy is (a model zipped with itself pairs twins)
    low = ~dead & (var < floor)
    if low.any():
        rows = np.flatnonzero(low)
        v = np.where(dead, 0.0, var)
        damp = np.minimum(np.minimum.outer(v[rows], v), floor) / floor
        true = cov[rows] / np.maximum(np.outer(std[rows], std), 1e-300)
        corr[rows] = true * damp
        corr[:, rows] = corr[rows].T
    if dead.any():
        corr[dead, :] = 0.0
        corr[:, dead] = 0.0
    return corr


def check_correlation(correlation, num_models: int = 2) -> np.ndarray:
    """Validate a correlation matrix for matching; return it as a new float64 array.

    It must be square, of size num_models * F with F >= 1, with no NaN (+-inf is allowed:
    -inf means "never merge this pair" to zipit). Raises ValueError otherwise.
    """
    try:
        c = np.array(correlation, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"correlation matrix is not numeric: {exc}") from None
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(
            f"correlation matrix has shape {c.shape}: it must be square, "
            f"{num_models}F x {num_models}F (model A's F features, then model B's)"
        )
    n = c.shape[0]
    if n == 0 or n % num_models:
        raise ValueError(
            f"correlation matrix is {n} x {n}: its size must be a positive multiple of "
            f"{num_models} (F features from each of the {num_models} models)"
        )
    if np.isnan(c).any():
        bad = tuple(int(b) for b in np.argwhere(np.isnan(c))[0])
        raise ValueError(
            f"correlation matrix contains NaN at {bad}: compute it with "
            "correlation_from_covariance, which maps dead channels to 0"
        )
    return c
