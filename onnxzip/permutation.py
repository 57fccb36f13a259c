"""permute_model(): reorder every feature group of a model; the function it computes is unchanged.

A model permuted this way is what a differently initialized copy of the same network looks
like to a matcher: the invariant behind the tests (a permuted model computes the same outputs;
zipping a model with a permuted copy of itself gives it back).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxzip.graph.layergraph import LayerGraph
from onnxzip.merge import GroupMerge, Merges
from onnxzip.split import build_zipped_model

__all__ = ["permute_model", "random_permutations"]


def random_permutations(graph: LayerGraph, seed: int = 0) -> dict[int, np.ndarray]:
    """A random permutation per feature group (identity for groups that reach an output; within
    each block for groups with blocks)."""
    rng = np.random.default_rng(seed)
    perms = {}
    head_orders: dict[int, np.ndarray] = {}
    for gid, g in graph.groups.items():
        if g.repeat_of is not None:
            continue  # grouped-query attention's queries follow their keys (below)
        if g.output or g.aligned or (g.rotary and g.attention_heads == 1):  # rotary tables pin a single head's channels
            perms[gid] = np.arange(g.size)
        elif g.attention_heads > 1:  # whole heads move together (shared by tied groups), channels move within heads
            d = g.size // g.attention_heads
            order = head_orders.setdefault(g.attention_tie if g.attention_tie is not None else gid, rng.permutation(g.attention_heads))
            within = (lambda: np.arange(d)) if g.rotary else (lambda: rng.permutation(d))  # rotary: channels stay in place
            perms[gid] = np.concatenate([order[h] * d + within() for h in range(g.attention_heads)])
        elif g.blocks:  # channels move within their blocks (grouped convolutions, channel splits)
            perm = np.arange(g.size)
            for block in g.blocks:
                b = np.asarray(block)
                perm[b] = b[rng.permutation(len(b))]
            perms[gid] = perm
        else:
            perms[gid] = rng.permutation(g.size)
    for gid, g in graph.groups.items():
        if g.repeat_of is not None:  # new query channel (h, i, c) <- old (h', i, c') where keys move (h, c) <- (h', c')
            source, repeats = g.repeat_of
            heads = graph.groups[source].attention_heads
            d = graph.groups[source].size // heads
            old = perms[source].reshape(heads, 1, d)
            perms[gid] = ((old // d * repeats + np.arange(repeats)[None, :, None]) * d + old % d).reshape(-1)
    return perms


def permute_model(graph: LayerGraph, perms: dict[int, np.ndarray]) -> onnx.ModelProto:
    """The model of ``graph`` with group g's channel c moved to position ``perms[g][c]``'s inverse.

    New channel j of group g is old channel ``perms[g][j]``.
    """
    merges = Merges()
    for gid, g in graph.groups.items():
        p = np.zeros((g.size, g.size))
        p[np.arange(g.size), perms[gid]] = 1.0  # new j <- old perm[j]
        merges[gid] = GroupMerge(p, p.T.copy(), fixed=g.output or g.aligned)
    model, _ = build_zipped_model([graph], merges, graph.num_layers, ["model"])
    return model
