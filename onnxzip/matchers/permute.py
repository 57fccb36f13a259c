""""permute": Git Re-Basin style weight matching (Ainsworth et al., ICLR 2023).

Every feature of model A is paired with exactly one feature of model B by a maximum-weight
assignment (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment(maximize=True)``) on
the cross-model block C[:F, F:] of the correlation matrix; no within-model merges. Cluster c is
(A feature c, B feature pi(c)); the merged feature is the pair's mean. This is the "permute"
baseline of ZipIt! (Stoica et al., ICLR 2024, Sec. 5), as in the authors' match_tensors_permute.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from onnxzip.matchers.correlation import check_correlation
from onnxzip.matchers.registry import register

__all__ = ["permute", "pairs_to_merge"]


def pairs_to_merge(partner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(merge F x 2F, unmerge 2F x F) for clusters c = (A feature c, B feature partner[c])."""
    partner = np.asarray(partner, dtype=np.intp)
    F = partner.shape[0]
    unmerge = np.zeros((2 * F, F), dtype=np.float64)
    unmerge[np.arange(F), np.arange(F)] = 1.0
    unmerge[F + partner, np.arange(F)] = 1.0
    merge = unmerge.T / 2.0
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
        "Pair each feature of model A with one feature of model B (Hungarian assignment "
        "maximizing total correlation) and average each pair."
    ),
)
def permute(correlation):
    """Hungarian matching of A's features to B's; returns (merge F x 2F, unmerge 2F x F)."""
    C = check_correlation(correlation, 2)
    F = C.shape[0] // 2
    block = _finite_for_assignment(C[:F, F:])
    rows, cols = linear_sum_assignment(block, maximize=True)
    partner = np.empty(F, dtype=np.intp)
    partner[rows] = cols
    return pairs_to_merge(partner)
