"""compute_merges(): one merge/unmerge per feature group, from the pair's statistics.

For each group the matcher turns the correlation of the N models' stacked features [f_1 ; ... ; f_N]
into a merge M (F x NF) and an unmerge U (NF x F); per model k, M_k and U_k are its F x F blocks. Groups that reach a graph
output keep their meaning in every model (class k of A is class k of B): they are averaged,
never matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxzip.graph.layergraph import LayerGraph
from onnxzip.graph.spaces import ConcatSpace, ExpandSpace, GroupSpace, InputSpace, RepeatSpace, SelectSpace, Space
from onnxzip.matchers import correlation_from_covariance, match, match_within_blocks
from onnxzip.stats.collect import PairStats

__all__ = ["GroupMerge", "Merges", "compute_merges", "repeat_matrix", "repeated_merge"]


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
    """gid -> GroupMerge, with merge and unmerge matrices for composite spaces."""

    def unmerge(self, space: Space, k: int) -> np.ndarray | None:
        """Model k's unmerge for a (possibly composite) space; None for the model inputs."""
        if isinstance(space, InputSpace) or space is None:
            return None
        return self._composite(space, k, "unmerge")

    def merge(self, space: Space, k: int) -> np.ndarray:
        """Model k's merge for a (possibly composite) space: merged channels x model k's channels."""
        return self._composite(space, k, "merge")

    def _composite(self, space: Space, k: int, which: str) -> np.ndarray:
        if isinstance(space, GroupSpace):
            gm = self[space.gid]
            return gm.unmerge_of(k) if which == "unmerge" else gm.merge_of(k)
        if isinstance(space, ConcatSpace):
            blocks = [self._composite(p, k, which) for p in space.parts]
            rows = sum(b.shape[0] for b in blocks)
            cols = sum(b.shape[1] for b in blocks)
            out = np.zeros((rows, cols))
            r = c = 0
            for b in blocks:
                out[r:r + b.shape[0], c:c + b.shape[1]] = b
                r += b.shape[0]
                c += b.shape[1]
            return out
        if isinstance(space, SelectSpace):
            # the merged model selects the same positions of the merged channels; the groups'
            # blocks keep the selected channels' clusters inside the selection
            idx = np.asarray(space.index, dtype=np.int64)
            return self._composite(space.part, k, which)[np.ix_(idx, idx)]
        if isinstance(space, ExpandSpace):
            u = self._composite(space.part, k, which)
            return np.kron(np.eye(space.outer), np.kron(u, np.eye(space.inner)))
        if isinstance(space, RepeatSpace):
            return repeat_matrix(self._composite(space.part, k, which), space.heads, space.repeats)
        raise TypeError(f"no {which} for {space!r}")

    def head_merge(self, gid: int, heads: int, k: int) -> np.ndarray:
        """Model k's merge of whole heads (heads x heads): the share of each of its heads in each
        merged head, for per-head parameters; a permutation of heads stays one."""
        m = self[gid].merge_of(k)
        d = m.shape[0] // heads
        return m.reshape(heads, d, heads, d).sum(axis=(1, 3)) / d


def repeat_matrix(p: np.ndarray, heads: int, repeats: int) -> np.ndarray:
    """A merge (or unmerge) of ``heads`` heads applied to every repeat of them (:class:`RepeatSpace`):
    entry ((g, i, c), (h, j, e)) is ``p[(g, c), (h, e)]`` when ``i == j``, else 0."""
    d = p.shape[0] // heads
    blocks = p.reshape(heads, d, heads, p.shape[1] // heads)
    out = np.einsum("acbe,ij->aicbje", blocks, np.eye(repeats))
    return out.reshape(heads * repeats * d, heads * repeats * (p.shape[1] // heads))


def repeated_merge(source: GroupMerge, heads: int, repeats: int, n_models: int) -> GroupMerge:
    """Grouped-query attention's queries: the keys' merge on every repeat of the key heads."""
    return GroupMerge(np.hstack([repeat_matrix(source.merge_of(k), heads, repeats) for k in range(n_models)]),
                      np.vstack([repeat_matrix(source.unmerge_of(k), heads, repeats) for k in range(n_models)]),
                      fixed=source.fixed)


def _fold_repeats(c: np.ndarray, heads: int, repeats: int, n_models: int) -> np.ndarray:
    """The similarity of the queries' features folded onto the key heads they meet: entry
    ((a, g, c), (b, h, e)) is the mean over repeats i of the queries' ((a, g, i, c), (b, h, i, e))."""
    f = c.shape[0] // n_models
    d = f // (heads * repeats)
    blocks = c.reshape(n_models, heads, repeats, d, n_models, heads, repeats, d)
    folded = np.einsum("agidbhie->agdbhe", blocks) / repeats
    return folded.reshape(n_models * heads * d, n_models * heads * d)


# Weight of the tie-break below: far under the differences that decide real matches.
TIE_BREAK = 1e-4
# A feature whose std is at most this fraction of the group's scale is constant on the data.
CONSTANT = 1e-6
# Correlations this close to 1 count as 1: the statistics form their products in float32
# (stats/accumulate.py), whose rounding (about 1e-6) can rank a near-copy above an exact copy.
NEAR_ONE = 1e-5


def similarity(group_stats, keys: np.ndarray | None = None) -> np.ndarray:
    """The matchers' similarity: the correlation of the features (paper Sec. 4.3), with ties
    broken towards features of similar mean and spread.

    Features that are perfectly correlated (or constant) cannot be told apart by correlation, yet
    merging two of them with different means changes the model; ``TIE_BREAK`` times the relative
    distance of (mean, std) separates them without moving any match that correlation decides.

    Correlations within float32 rounding of 1 count as 1, so that the tie-breaks, not rounding,
    decide between a feature's exact copy and a near-copy.

    Features constant on the calibration data (a ReLU that never fires, a saturated ReLU6) are
    all alike there, yet may differ on other inputs; ``keys`` (one row per feature, e.g. the
    mean and std of the pre-activations that make it) tells two constant features apart the
    same way, so that a model zipped with a copy of itself pairs each such feature with its twin.
    """
    corr = correlation_from_covariance(group_stats.covariance)
    mean = np.asarray(group_stats.mean, dtype=np.float64)
    std = np.sqrt(np.maximum(np.diagonal(group_stats.covariance), 0.0))
    scale = max(float(np.abs(mean).max(initial=0.0)), float(std.max(initial=0.0)), 1e-30)
    # constant next to the group's values (even when every feature of the group is: a network
    # whose deep features no longer depend on the input): what is left of their spread is
    # rounding, and its correlations are noise; the tie-breaks decide
    constant = std <= CONSTANT * scale
    corr[constant, :] = 0.0
    corr[:, constant] = 0.0
    dist = (np.abs(mean[:, None] - mean[None, :]) + np.abs(std[:, None] - std[None, :])) / scale
    sim = corr - TIE_BREAK * dist
    copies = np.argwhere(corr > 1.0 - NEAR_ONE)
    if len(copies):
        # exact and near copies all count as 1; told apart by their mean and std relative to
        # their own size too (rarely firing features differ by far less than the group's scale)
        i, j = copies[:, 0], copies[:, 1]
        sim[i, j] = 1.0 - TIE_BREAK * (dist[i, j] + _relative(mean, i, j) + _relative(std, i, j))
    if keys is not None:
        still = np.flatnonzero(constant)
        if len(still) > 1:
            k = np.asarray(keys, dtype=np.float64)[still]
            k_scale = max(float(np.abs(k).max(initial=0.0)), 1e-30)
            kd = np.abs(k[:, None, :] - k[None, :, :]).sum(axis=2) / k_scale
            sim[np.ix_(still, still)] -= TIE_BREAK * kd
    return sim


def _relative(x: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """|x_i - x_j| / (|x_i| + |x_j|) for index pairs (i, j), 0 where both are 0."""
    diff = np.abs(x[i] - x[j])
    size = np.abs(x[i]) + np.abs(x[j])
    return np.where(size > 0, diff / np.where(size > 0, size, 1.0), 0.0)


def preact_keys(graph: LayerGraph, stats: PairStats, gid: int, n_models: int) -> np.ndarray | None:
    """Per feature of group ``gid`` (all models stacked): mean and std of the pre-activation of
    each layer that writes the whole group, on the same rows for every model."""
    cols = []
    for i in graph.groups[gid].producers:
        out = graph.layers[i].out_space
        if not isinstance(out, GroupSpace) or out.gid != gid:
            continue
        moments = stats.preact_on_all_rows(i) if hasattr(stats, "preact_on_all_rows") else None
        if moments is None or len(moments) != n_models:
            continue
        mean = np.concatenate([np.asarray(m, dtype=np.float64) for m, _ in moments])
        std = np.sqrt(np.maximum(np.concatenate([np.asarray(v, dtype=np.float64) for _, v in moments]), 0.0))
        cols += [mean, std]
    if not cols or any(len(c) != n_models * graph.groups[gid].size for c in cols):
        return None
    return np.stack(cols, axis=1)


def fixed_merge(size: int, n_models: int) -> GroupMerge:
    """Channel i of every model merged with channel i of the others (averaged)."""
    eye = np.eye(size)
    return GroupMerge(np.hstack([eye / n_models] * n_models), np.vstack([eye] * n_models), fixed=True)


def _pair_turns(cross: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a rotary head's channel pairs (i, i + d/2): the angle that best turns the second model's
    pair onto the first's, and the agreement it reaches, from their cross-correlation block (first
    model's channels x second's). Turning both q's and k's pair by one angle leaves their products,
    and every position's rotation, unchanged."""
    h = cross.shape[0] // 2
    a, b = np.diag(cross)[:h] + np.diag(cross)[h:], np.diag(cross, -h) - np.diag(cross, h)
    return np.arctan2(b, a), np.hypot(a, b)


def _turn(angles: np.ndarray) -> np.ndarray:
    """The d x d matrix turning each pair (i, i + d/2) by ``angles[i]``."""
    h = len(angles)
    c, s = np.cos(angles), np.sin(angles)
    q = np.zeros((2 * h, 2 * h))
    idx = np.arange(h)
    q[idx, idx], q[idx, idx + h], q[idx + h, idx], q[idx + h, idx + h] = c, -s, s, c
    return q


def _head_pairing(corrs: list[np.ndarray], heads: int, rotary: list[str] | None = None) -> np.ndarray:
    """Pair model A's heads with model B's: Hungarian on the summed within-head matching scores.
    For a rotary group channel i of one head only meets channel i of the other ("fixed": the
    diagonal), or its pair (i, i + d/2) turned by the best angle ("pairs")."""
    from scipy.optimize import linear_sum_assignment

    score = np.zeros((heads, heads))
    for c, kind in zip(corrs, rotary or [None] * len(corrs)):
        f = c.shape[0] // 2
        d = f // heads
        cross = np.nan_to_num(c[:f, f:], neginf=-1.0, posinf=1.0)
        for i in range(heads):
            for j in range(heads):
                block = cross[i * d:(i + 1) * d, j * d:(j + 1) * d]
                if kind == "pairs":
                    score[i, j] += _pair_turns(block)[1].sum()
                elif kind == "fixed":
                    score[i, j] += np.trace(block)
                else:
                    r, k = linear_sum_assignment(block, maximize=True)
                    score[i, j] += block[r, k].sum()
    _, pairing = linear_sum_assignment(score, maximize=True)
    return pairing


def _rotary_kind(g) -> str | None:
    return ("pairs" if g.rotary_pairs else "fixed") if g.rotary else None


def head_merges(groups: list, stats: PairStats, method: str, params: dict, n_models: int = 2,
                queries: dict | None = None) -> dict[int, GroupMerge]:
    """Merges for head-structured groups that share one assignment of heads (attention).

    Whole heads are paired across the models (identity for "average"): every other model's heads
    with the first model's, one Hungarian assignment each; then within each tuple of heads the
    method matches the heads' channels. Merged head i is the first model's head i with its partners;
    q and k of a head share one group, v and the output projection another (the builder ties them).
    A rotary group (RoPE: cos/sin tables shared by all heads along the within-head axis) keeps
    channels in place within heads: channel i of a merged head averages channel i of its members
    (``onnxzip.ops.rotary``).

    ``queries`` maps a grouped-query attention's key group to the query groups that repeat it: their
    similarity, folded onto the key heads, counts with the keys' in the pairing and the matching.
    """
    heads = groups[0].attention_heads
    corrs = {g.gid: similarity(stats.groups[g.gid]) for g in groups if g.gid in stats.groups}
    for gid, repeating in (queries or {}).items():
        if gid not in corrs:
            continue
        folded = [_fold_repeats(similarity(stats.groups[q.gid]), q.attention_heads // q.repeat_of[1], q.repeat_of[1],
                                n_models) * q.repeat_of[1] for q in repeating if q.gid in stats.groups]
        corrs[gid] = (corrs[gid] + sum(folded)) / (1 + sum(q.repeat_of[1] for q in repeating if q.gid in stats.groups))
    rotary = [_rotary_kind(g) for g in groups if g.gid in corrs]
    if method == "average" or not corrs:
        pairings = [np.arange(heads)] * (n_models - 1)
    else:
        pairings = [_head_pairing([_with_first(c, k, n_models) for c in corrs.values()], heads, rotary)
                    for k in range(1, n_models)]
    out = {}
    for g in groups:
        if g.gid not in corrs:
            out[g.gid] = fixed_merge(g.size, n_models)
            continue
        out[g.gid] = _head_group_merge(g, corrs[g.gid], pairings, method, params, n_models)
    return out


def _with_first(c: np.ndarray, k: int, n_models: int) -> np.ndarray:
    """The correlation of the first model's and model k's features (2F x 2F) out of all N models'."""
    f = c.shape[0] // n_models
    idx = np.concatenate([np.arange(f), k * f + np.arange(f)])
    return c[np.ix_(idx, idx)]


def _head_group_merge(g, c: np.ndarray, pairings: list, method: str, params: dict, n_models: int) -> GroupMerge:
    """One head-structured group's merge: merged head i from the first model's head i and its
    partner ``pairings[k - 1][i]`` in every other model k."""
    f = g.size
    heads = g.attention_heads
    d = f // heads
    m_full = np.zeros((f, n_models * f))
    u_full = np.zeros((n_models * f, f))
    for i in range(heads):
        members = [i] + [int(p[i]) for p in pairings]
        idx = np.concatenate([k * f + h * d + np.arange(d) for k, h in enumerate(members)])
        if g.rotary:
            # channels in place, or each pair (i, i + d/2) of every other model turned onto the
            # first model's: merged = mean_k Q_k x_k, model k ~ Q_k^T merged
            turns = [np.eye(d)] + [_turn(_pair_turns(c[i * d:(i + 1) * d, k * f + h * d:k * f + (h + 1) * d])[0])
                                   if g.rotary_pairs else np.eye(d) for k, h in enumerate(members[1:], start=1)]
            m, u = np.hstack([q / n_models for q in turns]), np.vstack([q.T for q in turns])
        else:
            m, u = match(c[np.ix_(idx, idx)], method=method, **{**params, "num_models": n_models})
        m_full[i * d:(i + 1) * d, idx] = m
        u_full[idx, i * d:(i + 1) * d] = u
    return GroupMerge(m_full, u_full)


def compute_merges(graph: LayerGraph, stats: PairStats, method: str, params: dict, n_models: int = 2) -> Merges:
    """Match every feature group of ``graph`` (the first model's layer graph)."""
    merges = Merges()
    ties: dict[int, list] = {}
    queries: dict[int, list] = {}  # grouped-query attention: key group -> the query groups repeating it
    for gid, group in graph.groups.items():
        if group.repeat_of is not None:
            queries.setdefault(group.repeat_of[0], []).append(group)
        elif group.attention_heads > 1 and not group.output:
            ties.setdefault(group.attention_tie if group.attention_tie is not None else gid, []).append(group)
    for tied in ties.values():
        merges.update(head_merges(tied, stats, method, params, n_models, queries))
    for gid, group in graph.groups.items():
        if gid in merges or group.repeat_of is not None:
            continue
        if group.output or group.aligned or gid not in stats.groups:
            merges[gid] = fixed_merge(group.size, n_models)
            continue
        if group.rotary:  # rotary tables outside head-structured groups: channels must stay in place
            eye = np.eye(group.size)
            merges[gid] = GroupMerge(np.hstack([eye / n_models] * n_models), np.vstack([eye] * n_models))
            continue
        sim = similarity(stats.groups[gid], preact_keys(graph, stats, gid, n_models))
        m, u = match_within_blocks(sim, group.blocks, method=method, **{**params, "num_models": n_models})
        merges[gid] = GroupMerge(np.asarray(m, dtype=np.float64), np.asarray(u, dtype=np.float64))
    for source, repeating in queries.items():
        for q in repeating:
            merges[q.gid] = repeated_merge(merges[source], graph.groups[source].attention_heads, q.repeat_of[1], n_models)
    return merges
