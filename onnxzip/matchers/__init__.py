"""The matchers: one module per method, found through a registry (ZipIt!, Stoica et al., ICLR 2024).

``match(correlation, method="zipit", num_models=N, **params) -> (merge, unmerge)`` turns the
NF x NF correlation matrix of [features of model 1 ; ... ; features of model N] (N = 2 unless
given) into a merge matrix M (F x NF, each row the mean over one cluster's members) and an
unmerge matrix U (NF x F, 0/1), with M @ U = I. Split by model: M = [M_1 | ... | M_N],
U = [U_1 ; ... ; U_N]. Every matcher function takes ``num_models``.

Built-in methods (see :func:`list_matchers`): "zipit" (greedy zip, the paper's method),
"permute" (Hungarian assignment across models, Git Re-Basin) and "average" (identity pairs).
"""

from __future__ import annotations

import numpy as np

from onnxzip.matchers.correlation import check_correlation, correlation_from_covariance
from onnxzip.matchers.registry import (
    Matcher,
    Param,
    get_matcher,
    list_matchers,
    register,
    validate_params,
)

# Importing the modules registers the built-in matchers.
from onnxzip.matchers import average as _average  # noqa: F401
from onnxzip.matchers import permute as _permute  # noqa: F401
from onnxzip.matchers import zipit as _zipit  # noqa: F401

__all__ = [
    "match",
    "match_within_blocks",
    "list_matchers",
    "get_matcher",
    "validate_params",
    "register",
    "Matcher",
    "Param",
    "correlation_from_covariance",
]


def match(correlation, method: str = "zipit", num_models: int | None = None, **params) -> tuple[np.ndarray, np.ndarray]:
    """Match features with ``method``; returns (merge F x NF, unmerge NF x F), float64.

    ``correlation``: square NF x NF for ``num_models`` = N models (default 2, or zipit's
    ``num_models`` parameter), features of the first model first; any diagonal (the matcher sets
    it); no NaN (+-inf allowed). Every matcher is called with ``num_models``. Unknown method or
    parameter, or a parameter out of range: OptionError. Malformed matrix: ValueError.
    """
    matcher = get_matcher(method)
    declared = any(p.name == "num_models" for p in matcher.params)
    if num_models is not None and declared:
        params["num_models"] = num_models
    params = validate_params(matcher.name, params)
    n = int(params["num_models"]) if declared else int(num_models or 2)
    c = check_correlation(correlation, n)
    return matcher.function(c, **{**params, "num_models": n})


def match_within_blocks(correlation, blocks, method: str = "zipit", **params) -> tuple[np.ndarray, np.ndarray]:
    """:func:`match` restricted to a partition of the features: block-diagonal merge and unmerge.

    ``blocks``: tuples of feature indices (within one model's F) that partition ``range(F)``; a
    feature is matched only with features of its own block, in its own and the other models
    (a grouped convolution reads each block of its input channels apart; a channel split sends
    each block its own way). The method runs on each block's sub-matrix (the block's features of
    every model), and merged feature slots are the block's own channel positions, so the merged
    channels of a block sit where the block's channels were. ``blocks`` empty: plain :func:`match`.
    Within-model budgets (zipit's beta) apply per block.
    """
    if not blocks:
        return match(correlation, method=method, **params)
    c = np.asarray(correlation, dtype=np.float64)
    n = int(params.get("num_models") or 2)
    f = c.shape[0] // n
    covered = np.sort(np.concatenate([np.asarray(b, dtype=np.int64) for b in blocks]))
    if not np.array_equal(covered, np.arange(f)):
        raise ValueError(f"blocks do not partition the {f} features of a model")
    merge, unmerge = np.zeros((f, n * f)), np.zeros((n * f, f))
    for block in blocks:
        b = np.asarray(block, dtype=np.int64)
        idx = np.concatenate([k * f + b for k in range(n)])
        m, u = match(c[np.ix_(idx, idx)], method=method, **params)
        merge[np.ix_(b, idx)] = m
        unmerge[np.ix_(idx, b)] = u
    return merge, unmerge
