"""compute_merges(): one merge/unmerge per feature group, from the pair's statistics.

For each group the matcher turns the correlation of [f_A ; f_B] into a merge M (F x 2F) and an
unmerge U (2F x F); per model k, M_k and U_k are its F x F blocks. Groups that reach a graph
output keep their meaning in every model (class k of A is class k of B): they are averaged,
never matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxzip.graph.layergraph import LayerGraph
from onnxzip.graph.spaces import ConcatSpace, ExpandSpace, GroupSpace, InputSpace, Space
from onnxzip.match import correlation_from_covariance, match
from onnxzip.stats.collect import PairStats

__all__ = ["GroupMerge", "Merges", "compute_merges"]


@dataclass
class GroupMerge:
    merge: np.ndarray  # F x (n F)
    unmerge: np.ndarray  # (n F) x F
    fixed: bool = False  # averaged without matching (output groups)

    def merge_of(self, k: int) -> np.ndarray:
        f = self.merge.shape[0]
        return self.merge[:, k * f:(k + 1) * f]

    def unmerge_of(self, k: int) -> np.ndarray:
        f = self.unmerge.shape[1]
        return self.unmerge[k * f:(k + 1) * f]


class Merges(dict):
    """gid -> GroupMerge, with unmerge matrices for composite spaces."""

    def unmerge(self, space: Space, k: int) -> np.ndarray | None:
        """Model k's unmerge for a (possibly composite) space; None for the model inputs."""
        if isinstance(space, InputSpace) or space is None:
            return None
        if isinstance(space, GroupSpace):
            return self[space.gid].unmerge_of(k)
        if isinstance(space, ConcatSpace):
            blocks = [self.unmerge(p, k) for p in space.parts]
            rows = sum(b.shape[0] for b in blocks)
            cols = sum(b.shape[1] for b in blocks)
            out = np.zeros((rows, cols))
            r = c = 0
            for b in blocks:
                out[r:r + b.shape[0], c:c + b.shape[1]] = b
                r += b.shape[0]
                c += b.shape[1]
            return out
        if isinstance(space, ExpandSpace):
            u = self.unmerge(space.part, k)
            return np.kron(np.eye(space.outer), np.kron(u, np.eye(space.inner)))
        raise TypeError(f"no unmerge for {space!r}")


def fixed_merge(size: int, n_models: int) -> GroupMerge:
    eye = np.eye(size)
    return GroupMerge(np.hstack([eye / n_models] * n_models), np.vstack([eye] * n_models), fixed=True)


def compute_merges(graph: LayerGraph, stats: PairStats, method: str, params: dict, n_models: int = 2) -> Merges:
    """Match every feature group of ``graph`` (the first model's layer graph)."""
    merges = Merges()
    for gid, group in graph.groups.items():
        if group.output or gid not in stats.groups:
            merges[gid] = fixed_merge(group.size, n_models)
            continue
        corr = correlation_from_covariance(stats.groups[gid].covariance)
        m, u = match(corr, method=method, **params)
        merges[gid] = GroupMerge(np.asarray(m, dtype=np.float64), np.asarray(u, dtype=np.float64))
    return merges
