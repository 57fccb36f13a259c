""""permute": Git Re-Basin style weight matching (Ainsworth et al., ICLR 2023).

Every feature of model A is paired with exactly one feature of model B by a maximum-weight
assignment (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment(maximize=True)``) on
the cross-model block C[:F, F:] of the correlation matrix; no within-model merges. Cluster c is
(A feature c, B feature pi(c)); the merged feature is the pair's mean. This is the "permute"
baseline of ZipIt! (Stoica et al., ICLR 2024, Sec. 5), as in the authors' match_tensors_permute.
For N models every model k > 0 is aligned to model 0 by its own assignment on C[:F, kF:(k+1)F]
and cluster c averages feature c of model 0 with its partner in every other model.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from onnxzip.matchers.correlation import check_correlation
from onnxzip.matchers.registry import register

__all__ = ["permute", "pairs_to_merge"]


def pairs_to_merge(partner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(merge F x NF, unmerge NF x F) for clusters c = (model 0's feature c, model k's feature
    partner[k - 1][c] for k >= 1); ``partner`` of shape [F] (two models) or [N - 1, F]."""
    partner = np.asarray(partner, dtype=np.intp)
    partner = partner.reshape(-1, partner.shape[-1])
    F, n = partner.shape[1], partner.shape[0] + 1
    unmerge = np.zeros((n * F, F), dtype=np.float64)
    unmerge[np.arange(F), np.arange(F)] = 1.0
    for k, p in enumerate(partner, start=1):
        unmerge[k * F + p, np.arange(F)] = 1.0
    merge = unmerge.T / float(n)
    return merge, unmerge


def _finite_for_assignment(block: np.ndarray) -> np.ndarray:
    """Replace +-inf so that the assignment avoids -inf (prefers +inf) pairs whenever it can."""
    finite = np.isfinite(block)
    if finite.all():
        return block
    vals = block[finite]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 0.0)
    span = (hi - lo + 1.0) * (block.shape[0] + 1)
    out = block.copy()
    out[block == np.inf] = hi + span
    out[block == -np.inf] = lo - span
    return out


@register(
    "permute",
    reference=(
        "Ainsworth, Hayase, Srinivasa, 'Git Re-Basin: Merging Models modulo Permutation "
        "Symmetries', ICLR 2023; the 'permute' baseline of ZipIt! (Stoica et al., ICLR 2024)"
    ),
    description=(
        "Pair each feature of model A with one feature of every other model (Hungarian "
        "assignment maximizing total correlation, each model against A) and average."
    ),
)
def permute(correlation, num_models: int = 2):
    """Hungarian matching of every model's features to model 0's; returns (merge F x NF, unmerge NF x F)."""
    C = check_correlation(correlation, num_models)
    F = C.shape[0] // num_models
    partner = np.empty((num_models - 1, F), dtype=np.intp)
    for k in range(1, num_models):
        block = _finite_for_assignment(C[:F, k * F:(k + 1) * F])
        rows, cols = linear_sum_assignment(block, maximize=True)
        partner[k - 1, rows] = cols
    return pairs_to_merge(partner)
