""""average": plain weight averaging, feature c of A with feature c of B (no matching).

The floor baseline of ZipIt! (Stoica et al., ICLR 2024, Sec. 5; the authors'
match_tensors_identity): M = [I/2, I/2], U = [I; I]; for N models M = [I/N, ...], U = [I; ...].
"""

from __future__ import annotations

import numpy as np

from onnxzip.matchers.correlation import check_correlation
from onnxzip.matchers.permute import pairs_to_merge
from onnxzip.matchers.registry import register

__all__ = ["average"]


@register(
    "average",
    reference=(
        "Weight averaging baseline of ZipIt! (Stoica et al., ICLR 2024, Sec. 5; "
        "Wortsman et al., 'Model soups', ICML 2022)"
    ),
    description="Average feature c of model A with feature c of model B (no matching); N models: feature c of each.",
)
def average(correlation, num_models: int = 2):
    """Feature c of every model together; returns (merge F x NF, unmerge NF x F). The correlation gives only F."""
    C = check_correlation(correlation, num_models)
    F = C.shape[0] // num_models
    return pairs_to_merge(np.tile(np.arange(F), (num_models - 1, 1)))
