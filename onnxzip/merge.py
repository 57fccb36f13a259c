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
from onnxzip.matchers import correlation_from_covariance, match
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

    def merge(self, space: Space, k: int) -> np.ndarray:
        """Model k's merge for a group or a channel concatenation of groups (block diagonal)."""
        if isinstance(space, GroupSpace):
            return self[space.gid].merge_of(k)
        if isinstance(space, ConcatSpace):
            blocks = [self.merge(p, k) for p in space.parts]
            out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)))
            r = c = 0
            for b in blocks:
                out[r:r + b.shape[0], c:c + b.shape[1]] = b
                r += b.shape[0]
                c += b.shape[1]
            return out
        raise TypeError(f"no merge for {space!r}")

    def head_merge(self, gid: int, heads: int, k: int) -> np.ndarray:
        """Model k's merge of whole heads (heads x heads): the share of each of its heads in each
        merged head, for per-head parameters; a permutation of heads stays one."""
        m = self[gid].merge_of(k)
        d = m.shape[0] // heads
        return m.reshape(heads, d, heads, d).sum(axis=(1, 3)) / d


# Weight of the tie-break below: far under the differences that decide real matches.
TIE_BREAK = 1e-4


def similarity(group_stats) -> np.ndarray:
    """The matchers' similarity: the correlation of the features (paper Sec. 4.3), with ties
    broken towards features of similar mean and spread.

    Features that are perfectly correlated (or constant) cannot be told apart by correlation, yet
    merging two of them with different means changes the model; ``TIE_BREAK`` times the relative
    distance of (mean, std) separates them without moving any match that correlation decides.
    """
    corr = correlation_from_covariance(group_stats.covariance)
    mean = np.asarray(group_stats.mean, dtype=np.float64)
    std = np.sqrt(np.maximum(np.diagonal(group_stats.covariance), 0.0))
    scale = max(float(np.abs(mean).max(initial=0.0)), float(std.max(initial=0.0)), 1e-30)
    dist = (np.abs(mean[:, None] - mean[None, :]) + np.abs(std[:, None] - std[None, :])) / scale
    return corr - TIE_BREAK * dist


def fixed_merge(size: int, n_models: int) -> GroupMerge:
    eye = np.eye(size)
    return GroupMerge(np.hstack([eye / n_models] * n_models), np.vstack([eye] * n_models), fixed=True)


def _head_pairing(corrs: list[np.ndarray], heads: int, rotary: list[bool] | None = None) -> np.ndarray:
    """Pair model A's heads with model B's: Hungarian on the summed within-head matching scores
    (for a rotary group, channel i of one head only meets channel i of the other: the diagonal)."""
    from scipy.optimize import linear_sum_assignment

    score = np.zeros((heads, heads))
    for c, fixed in zip(corrs, rotary or [False] * len(corrs)):
        f = c.shape[0] // 2
        d = f // heads
        cross = np.nan_to_num(c[:f, f:], neginf=-1.0, posinf=1.0)
        for i in range(heads):
            for j in range(heads):
                block = cross[i * d:(i + 1) * d, j * d:(j + 1) * d]
                if fixed:
                    score[i, j] += np.trace(block)
                    continue
                r, k = linear_sum_assignment(block, maximize=True)
                score[i, j] += block[r, k].sum()
    _, pairing = linear_sum_assignment(score, maximize=True)
    return pairing


def head_merges(groups: list, stats: PairStats, method: str, params: dict) -> dict[int, GroupMerge]:
    """Merges for head-structured groups that share one assignment of heads (attention).

    Whole heads are paired across the models (identity for "average"), then within each pair of
    heads the method matches the head's channels. Merged head i is A's head i with its partner;
    q and k of a head share one group, v and the output projection another (the builder ties them).
    A rotary group (RoPE: cos/sin tables shared by all heads along the within-head axis) keeps
    channels in place within heads: channel i of a merged head averages channel i of its members
    (``onnxzip.ops.rotary``).
    """
    heads = groups[0].attention_heads
    corrs = {g.gid: similarity(stats.groups[g.gid]) for g in groups if g.gid in stats.groups}
    rotary = [g.rotary for g in groups if g.gid in corrs]
    pairing = np.arange(heads) if method == "average" or not corrs else _head_pairing(list(corrs.values()), heads, rotary)
    out = {}
    for g in groups:
        f = g.size
        d = f // heads
        if g.gid not in corrs:
            out[g.gid] = fixed_merge(f, 2)
            continue
        c = corrs[g.gid]
        m_full = np.zeros((f, 2 * f))
        u_full = np.zeros((2 * f, f))
        for i in range(heads):
            j = pairing[i]
            idx = np.concatenate([np.arange(i * d, (i + 1) * d), f + np.arange(j * d, (j + 1) * d)])
            if g.rotary:
                m, u = np.hstack([np.eye(d) / 2, np.eye(d) / 2]), np.vstack([np.eye(d), np.eye(d)])
            else:
                m, u = match(c[np.ix_(idx, idx)], method=method, **params)
            m_full[i * d:(i + 1) * d, idx] = m
            u_full[idx, i * d:(i + 1) * d] = u
        out[g.gid] = GroupMerge(m_full, u_full)
    return out


def compute_merges(graph: LayerGraph, stats: PairStats, method: str, params: dict, n_models: int = 2) -> Merges:
    """Match every feature group of ``graph`` (the first model's layer graph)."""
    merges = Merges()
    ties: dict[int, list] = {}
    for gid, group in graph.groups.items():
        if group.attention_heads > 1 and not group.output and n_models == 2:
            ties.setdefault(group.attention_tie if group.attention_tie is not None else gid, []).append(group)
    for tied in ties.values():
        merges.update(head_merges(tied, stats, method, params))
    for gid, group in graph.groups.items():
        if gid in merges:
            continue
        if group.output or group.aligned or gid not in stats.groups:
            merges[gid] = fixed_merge(group.size, n_models)
            continue
        if group.rotary:  # more than two models: heads are not paired yet, channels must stay in place
            eye = np.eye(group.size)
            merges[gid] = GroupMerge(np.hstack([eye / n_models] * n_models), np.vstack([eye] * n_models))
            continue
        m, u = match(similarity(stats.groups[gid]), method=method, **params)
        merges[gid] = GroupMerge(np.asarray(m, dtype=np.float64), np.asarray(u, dtype=np.float64))
    return merges
