"""ZipIt! greedy zip of features (Stoica, Bolya et al., ICLR 2024, Sec. 4.3 "matching").

Given the correlation of the concatenated features of ``num_models`` models (F each, ordered model
by model), repeatedly merge the most correlated pair of live clusters until F clusters remain:

* sims = correlation with the diagonal set to -inf;
* pick the pair with the highest similarity; ties go to the lowest row-major (flat) index of
  the matrix, exactly as a flat ``argmax`` over the matrix with merged columns removed would;
* merge the higher index j into the lower index i (i survives and keeps its origin model);
  the merged cluster's similarity to every other cluster k becomes alpha * min(S[i,k], S[j,k])
  (rows and columns separately, so an asymmetric input stays consistent); with alpha <= 0 the
  merged cluster can merge no further (its row and column become -inf);
* a merge of two clusters of the same origin model spends one unit of that model's budget,
  int((merges // num_models) * beta + 1e-4) with merges = (num_models - 1) * F; once a budget
  is <= 0, every similarity between two clusters of that origin is -inf (from the start if the
  budget is 0, e.g. beta = 0: then only cross-model merges happen).
* if every remaining pair is -inf (only possible when the input holds -inf, or alpha overflows),
  the two lowest-index live clusters are merged, so the result always has F clusters.

Where this differs from the authors' code (``match_tensors_zipit``): with beta = 0 their code
still allows one within-model merge per model before masking, and their alpha <= 0 branch masks
index ranges that shift as columns are removed; here both follow the stated rule above.

Implementation: instead of removing a row and column per merge (O(F^3) with copies), dead
clusters are masked (their column set to -inf) and every row keeps its maximum and the lowest
column reaching it. A merge rewrites only row and column i and kills j, so only the rows whose
maximum sat at i or j (and the merged row) are rescanned, vectorized; the others are patched
from the new column i. For a symmetric input (the usual case) the new column i is the new row
i, so columns are written but never read. The picks, and so the result, are identical to the
column-removal algorithm. Typical cost: O(F) merges of O(F) vectorized work each, O(F^2) in
all; matrices with very many exact ties (e.g. all equal) make many rows rescan per merge and
degrade towards O(F^3) vectorized work, about the reference's time.
"""

from __future__ import annotations

import numpy as np

from onnxzip.matchers.correlation import check_correlation
from onnxzip.matchers.registry import Param, register

__all__ = ["zipit", "merge_from_labels", "zip_budget"]

_NEG = -np.inf


def zip_budget(num_features: int, num_models: int, beta: float) -> int:
    """Within-model merges allowed per model: int((merges // num_models) * beta + 1e-4)."""
    merges = (num_models - 1) * num_features
    return int((merges // num_models) * beta + 1e-4)


def merge_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(merge, unmerge) from each feature's cluster label; clusters ordered by lowest member."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # cluster order = lowest member index
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    col = rank[inverse.reshape(-1)]
    unmerge = np.zeros((n, order.size), dtype=np.float64)
    unmerge[np.arange(n), col] = 1.0
    sizes = unmerge.sum(axis=0)
    merge = unmerge.T / sizes[:, None]
    return merge, unmerge


@register(
    "zipit",
    reference=(
        "Stoica, Bolya, Bjorner, Ramesh, Hearn, Hoffman, 'ZipIt! Merging Models from Different "
        "Tasks without Training', ICLR 2024, Sec. 4.3 (arXiv:2305.03053)"
    ),
    description=(
        "Greedy zip: repeatedly merge the most correlated pair of features, within or across "
        "models, until F remain; within-model merges are limited by beta."
    ),
    params=(
        Param("alpha", float, 0.3, 0.0, 1.0, help=(
            "a merged feature's similarity to others is alpha * min of its members'; "
            "0: a merged feature merges no further")),
        Param("beta", float, 0.125, 0.0, 1.0, help=(
            "fraction of each model's share of merges that may be within the model "
            "(0: only across models)")),
        Param("num_models", int, 2, 2, None, help="number of models whose features are stacked"),
    ),
)
def zipit(correlation, alpha: float = 0.3, beta: float = 0.125, num_models: int = 2):
    """ZipIt! matching of ``num_models`` models' features; returns (merge F x nF, unmerge nF x F)."""
    # One function on purpose: the greedy loop below shares its working state (the similarity
    # matrix, row maxima and argmaxima, alive/dead/parent arrays, per-model budgets) across every
    # step, and it runs F to NF times per group; helpers per step would pass all of it around.
    C = check_correlation(correlation, num_models)
    alpha = float(alpha)
    n = C.shape[0]
    # Private working copy whose row stride is an odd number of cache lines: with a stride of
    # a power of two, writing one column hits one cache set and runs several times slower.
    pad = (8 - n) % 16
    S = np.empty((n, n + pad))[:, :n]
    S[...] = C
    del C
    F = n // num_models
    merges = n - F
    np.fill_diagonal(S, _NEG)

    budget = [zip_budget(F, num_models, beta)] * num_models
    killed = [False] * num_models
    if budget[0] <= 0:
        for m in range(num_models):
            S[m * F:(m + 1) * F, m * F:(m + 1) * F] = _NEG
            killed[m] = True

    # A dead cluster's column is -inf; its row is never read again, and its entry of a rebuilt
    # column is NaN so that no comparison with its (-inf) row maximum succeeds.
    symmetric = bool(np.array_equal(S, S.T))
    rowarg = S.argmax(axis=1)  # first (lowest) column among ties
    rowmax = S[np.arange(n), rowarg]
    alive = np.ones(n, dtype=bool)
    dead = np.zeros(n, dtype=bool)
    parent = np.arange(n)  # j -> the cluster it was merged into

    for _ in range(merges):
        r = int(rowmax.argmax())  # lowest row among ties
        if rowmax[r] == _NEG:
            # nothing finite left: merge the two lowest live clusters (flat index order)
            i, j = (int(x) for x in np.flatnonzero(alive)[:2])
        else:
            c = int(rowarg[r])
            i, j = (r, c) if r < c else (c, r)

        block = None
        o = i // F
        if o == j // F:
            budget[o] -= 1
            if budget[o] <= 0 and not killed[o]:
                killed[o] = True
                block = slice(o * F, (o + 1) * F)
                S[block, block] = _NEG

        alive[j] = False
        dead[j] = True
        parent[j] = i
        rowarg[j] = -1
        rowmax[j] = _NEG
        if alpha > 0:
            newrow = np.minimum(S[i], S[j])
            newrow *= alpha
            S[i] = newrow
            if symmetric:  # the live part of S stays symmetric: column i = row i
                newcol = newrow.copy()
            else:
                newcol = np.minimum(S[:, i], S[:, j])
                newcol *= alpha
        else:
            S[i] = _NEG
            newcol = np.full(n, _NEG)
        newcol[dead] = np.nan
        newcol[i] = _NEG
        S[:, i] = newcol
        S[:, j] = _NEG

        # Keep (rowmax, rowarg) = (max over live columns, lowest column reaching it) for
        # live rows. Only column i rose or fell, and column j died.
        cand = np.flatnonzero(newcol >= rowmax)  # column i reaches the row's max
        if cand.size:
            v = newcol[cand]
            better = (v > rowmax[cand]) | (rowarg[cand] > i)
            cand = cand[better]
            rowmax[cand] = v[better]
            rowarg[cand] = i
        # rescan: max sat at i and fell, or sat at j (now dead), or the row was rewritten
        need = ((rowarg == i) & (newcol < rowmax)) | (rowarg == j)
        need[i] = True
        if block is not None:
            need[block] |= alive[block]
        rows = np.flatnonzero(need)
        if rows.size == 1:
            k = int(rows[0])
            a = int(S[k].argmax())
            rowarg[k] = a
            rowmax[k] = S[k, a]
        else:
            sub = S[rows]
            a = sub.argmax(axis=1)
            rowarg[rows] = a
            rowmax[rows] = sub[np.arange(rows.size), a]

    labels = parent
    while True:  # pointer jumping: every feature to the root (lowest index) of its cluster
        nxt = labels[labels]
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    return merge_from_labels(labels)
