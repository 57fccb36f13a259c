"""Streaming accumulators: mean and covariance in float64, memory independent of the data size."""

from __future__ import annotations

import numpy as np

__all__ = ["CovarianceAccumulator", "MomentAccumulator", "as_samples"]


def as_samples(x: np.ndarray, axis: int) -> np.ndarray:
    """Rows = samples (every position of every item), columns = channels along ``axis``."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _select(rows: np.ndarray, w: np.ndarray | None, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Flatten ``[items, positions, D]`` to float64 rows and per-row weights.

    Items of weight 0 are dropped; 0/1 weights become None (the fast, unweighted path).
    """
    if w is not None:
        w = np.asarray(w, dtype=np.float64)
        if (w == 1).all():
            w = None
        elif np.isin(w, (0.0, 1.0)).all():
            rows = rows[w == 1]
            w = None
        else:
            keep = w > 0
            rows, w = rows[keep], np.repeat(w[keep], rows.shape[1])
    return rows.reshape(-1, dim).astype(np.float64), w


class CovarianceAccumulator:
    """Mean and covariance of the columns of streamed ``[items, positions, D]`` blocks.

    Sums are taken around a fixed shift (the first block's mean) so that float64 keeps its
    precision on features with a large mean.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0.0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(dim)
        self.s2 = np.zeros((dim, dim))

    def update(self, rows: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add samples; ``rows`` is ``[items, positions, D]`` (see :func:`as_samples`)."""
        x, w = _select(rows, weights, self.dim)
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        x -= self.shift
        if w is None:
            self.count += x.shape[0]
            self.s1 += x.sum(axis=0)
            self.s2 += x.T @ x
        else:
            self.count += w.sum()
            self.s1 += w @ x
            xs = x * np.sqrt(w)[:, None]
            self.s2 += xs.T @ xs

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros(self.dim)
        return self.shift + self.s1 / self.count

    @property
    def covariance(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros((self.dim, self.dim))
        m = self.s1 / self.count
        return self.s2 / self.count - np.outer(m, m)


class MomentAccumulator:
    """Per-channel mean and variance of streamed ``[items, positions, C]`` blocks."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0.0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(dim)
        self.s2 = np.zeros(dim)

    def update(self, rows: np.ndarray, weights: np.ndarray | None = None) -> None:
        x, w = _select(rows, weights, self.dim)
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        x -= self.shift
        if w is None:
            self.count += x.shape[0]
            self.s1 += x.sum(axis=0)
            self.s2 += (x * x).sum(axis=0)
        else:
            self.count += w.sum()
            self.s1 += w @ x
            self.s2 += w @ (x * x)

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros(self.dim)
        return self.shift + self.s1 / self.count

    @property
    def var(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros(self.dim)
        m = self.s1 / self.count
        return np.maximum(self.s2 / self.count - m * m, 0.0)
