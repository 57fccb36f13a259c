"""Statistics correction after merging (REPAIR, Jordan et al., ICLR 2023; method.md).

Merging averages features, which shrinks and shifts their distribution; exported models have
BatchNorm folded into their weights, so it cannot simply be reset. For every zipped layer, in
topological order (one level of the layer graph at a time), the merged model's per-channel
pre-activation mean and std are measured on calibration data and the layer's weights and bias
are rescaled so they match the source models' statistics there, averaged through the merge
matrix (each model's statistics from its own task's samples, on the same rows).

Each level runs only the nodes between the activations earlier levels left behind and its own
layers (see ``Frontier``), so the whole correction costs about one forward pass of the merged
model. Large calibration sets are measured on an evenly spread subset of rows (see
:func:`repair`), which bounds the memory those kept activations take.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.frontier import RUN_BUDGET_BYTES, Chunk, Frontier, Weights, node_inputs, subset_rows
from onnxzip.graph.samples import samples_first, samples_first_axis
from onnxzip.graph.spaces import leaves
from onnxzip.merge import Merges
from onnxzip.split import LayerSite, ZipLayout
from onnxzip.stats.accumulate import SplitMoments
from onnxzip.stats.collect import PairStats, has_static_batch, per_row, subset_step

__all__ = ["RepairReport", "repair", "target_statistics", "correct_layer", "default_repair_samples",
           "REPAIR_SAMPLES", "FRONTIER_BUDGET_BYTES"]

_EPS = 1e-8
_MAX_SCALE = 1e4

# Calibration rows the statistics are measured on by default: all of them up to REPAIR_SAMPLES (an
# evenly spread subset of larger sets, so that memory does not grow with the calibration data;
# bench/results/defaults_table.md: even 128 rows lose nothing on average over the bundled pairs),
# fewer if the activations kept between levels (about 3x the largest activation per row, measured
# in the statistics pass) would not fit FRONTIER_BUDGET_BYTES (a warning says so).
REPAIR_SAMPLES = 512
FRONTIER_BUDGET_BYTES = 1536 << 20
MIN_REPAIR_SAMPLES = 32



@dataclass
class RepairReport:
    layers: int
    passes: int
    samples: int


def _writes_output(graph, layer) -> bool:
    """The layer writes a group that reaches the outputs (logits): its branch copy is left alone."""
    return any(graph.groups[leaf.gid].output for leaf in leaves(layer.out_space) if leaf.gid in graph.groups)


def target_statistics(site: LayerSite, graphs, merges: Merges, stats: PairStats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std the merged layer should have: the sources' own, averaged through M."""
    per_model = stats.preact[site.index]
    if site.model >= 0:
        mean, var = per_model[site.model]
        return mean, np.sqrt(var)
    space = graphs[0].layers[site.index].out_space
    mean = np.zeros(merges.merge(space, 0).shape[0])
    std = np.zeros_like(mean)
    for k, (m, v) in enumerate(per_model):
        mk = merges.merge(space, k)
        mean += mk @ m
        std += mk @ np.sqrt(v)
    return mean, std


def _scale_along(x: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * s.reshape(shape)


def correct_layer(model: onnx.ModelProto, weights: Weights, site: LayerSite, mean_now, std_now, mean_t, std_t):
    """Rescale a layer so its pre-activation has mean ``mean_t`` and std ``std_t``.

    Returns ``(s, offset)``: the new pre-activation is ``s * old + offset`` per channel.
    """
    s = np.where(std_now > _EPS, std_t / np.maximum(std_now, _EPS), 1.0)
    s = np.clip(s, 0.0, _MAX_SCALE)
    offset = mean_t - s * mean_now
    w = weights.get(site.weight)
    weights.set(site.weight, _scale_along(w.astype(np.float64), s, site.out_axis).astype(w.dtype))
    for _, init, axis, _sign in site.chain:
        c = weights.get(init)
        if c.ndim == 0 or c.shape[axis] == 1:
            continue
        weights.set(init, _scale_along(c.astype(np.float64), s, axis).astype(c.dtype))
    if site.bias is not None:
        b = weights.get(site.bias)
        weights.set(site.bias, (b.astype(np.float64) * s + offset).astype(b.dtype))
    else:
        shift_layer(model, weights, site, offset)
    return s, offset


def shift_layer(model: onnx.ModelProto, weights: Weights, site: LayerSite, offset: np.ndarray) -> None:
    """Add ``offset`` (one value per channel) to the layer's pre-activation: to its bias, else to
    the first bias Add after it, else through a new bias (an input of a Conv or Gemm, an Add after a
    MatMul)."""
    w = weights.get(site.weight)
    if site.bias is not None:
        b = weights.get(site.bias)
        weights.set(site.bias, (b.astype(np.float64) + offset.reshape(b.shape)).astype(b.dtype))
        return
    if site.chain:
        _, init, axis, sign = site.chain[0]
        c = weights.get(init)
        if c.ndim > axis and c.shape[axis] == offset.size:
            shape = [1] * c.ndim
            shape[axis] = -1
            weights.set(init, (c.astype(np.float64) + sign * offset.reshape(shape)).astype(c.dtype))
            return
    node = next(n for n in model.graph.node if n.name == site.node)
    name = site.weight + "_repair_bias"
    if node.op_type in ("Conv", "Gemm"):
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        weights.set(name, offset.astype(w.dtype))
        site.bias = name
        return
    # MatMul: add the bias after it, before the bias Adds already there
    out = node.output[0]
    node.output[0] = out + "/pre_bias"
    add = helper.make_node("Add", [out + "/pre_bias", name], [out], name=site.node + "/repair_bias")
    idx = list(model.graph.node).index(node)
    model.graph.node.insert(idx + 1, add)
    weights.set(name, offset.astype(w.dtype))
    site.chain = [(site.node + "/repair_bias", name, 0, 1.0)] + list(site.chain)


def default_repair_samples(stats: PairStats) -> int:
    """How many rows the correction measures on by default: up to :data:`REPAIR_SAMPLES`, fewer
    when their kept activations would not fit :data:`FRONTIER_BUDGET_BYTES` (at least MIN_REPAIR_SAMPLES)."""
    per_row = 3 * getattr(stats, "largest_activation_bytes", 0.0)
    fit = int(FRONTIER_BUDGET_BYTES // per_row) if per_row else REPAIR_SAMPLES
    return min(REPAIR_SAMPLES, max(MIN_REPAIR_SAMPLES, fit))


def _site_nodes(site: LayerSite) -> set[str]:
    return {site.node} | {c[0] for c in site.chain}


def _restorable(model: onnx.ModelProto, weights: Weights, site: LayerSite, shared: set[str]) -> bool:
    """Whether correcting ``site`` maps its pre-activation exactly to ``s * z + offset``."""
    if site.preact in shared:
        return False
    nodes = _site_nodes(site)
    by_name = {n.name: n for n in model.graph.node if n.name in nodes}
    if len(by_name) != len(nodes) or not any(site.preact in n.output for n in by_name.values()):
        return False
    for _, init, axis, _sign in site.chain:
        if init not in weights.index:
            return False
        dims = weights.model.graph.initializer[weights.index[init]].dims
        if len(dims) == 0 or axis >= len(dims) or dims[axis] == 1:
            return False
    inner = {o for n in by_name.values() for o in n.output if o and o != site.preact}
    for n in model.graph.node:
        if n.name in nodes:
            continue
        if inner & set(node_inputs(n)):
            return False
    return True


def repair(model: onnx.ModelProto, layout: ZipLayout, graphs, merges: Merges, stats: PairStats, batches,
           providers=None, branches: bool = True, progress=None, max_samples: int | None = None) -> RepairReport:
    """Correct the zipped model in place; ``batches()`` yields calibration batches afresh.

    With ``branches``, layers inside each task's branch are corrected too, toward their own
    model's statistics on its own task's samples (a branch reads merged features through its
    unmerge, whose statistics are the cluster's average, not its model's own). Layers that
    write a task's outputs (logits) are left as they are.

    The merged model's statistics are measured on an evenly spread subset of at most
    ``max_samples`` calibration rows (``0`` or a negative value: all rows): every k-th valid
    row, k the smallest power of two that gives at most that many. By default
    (:func:`default_repair_samples`) :data:`REPAIR_SAMPLES`, fewer for models whose activations would
    not fit :data:`FRONTIER_BUDGET_BYTES`. The targets (the source models' statistics) are taken on
    the same rows (``stats.subset_preact``), so a model zipped with itself is left unchanged;
    hence never more rows than the statistics pass took targets on (``stats.preact_step``).
    """
    if max_samples is None:
        max_samples = default_repair_samples(stats)
    weights = Weights(model)
    norms = list(layout.norm_sites)
    sites = [
        s for s in layout.sites
        if s.model == -1 or (branches and not _writes_output(graphs[s.model], graphs[s.model].layers[s.index]))
    ]
    levels = sorted({(s.model >= 0, float(s.number)) for s in sites} | {(False, n.level) for n in norms})
    if not levels:
        return RepairReport(layers=0, passes=0, samples=0)
    per_run = None
    if getattr(stats, "activation_bytes", 0):
        per_run = max(1, int(RUN_BUDGET_BYTES // stats.activation_bytes))
    # no finer than the rows the targets were taken on
    step = max(subset_step(stats.samples, None if max_samples <= 0 else int(max_samples)), getattr(stats, "preact_step", 1))
    if step > 1 and not getattr(stats, "preact_parts", None):
        step = 1  # no per-subset targets to compare with: measure on all rows
    chunks, feeds, rows = subset_rows(batches, stats.owners, step, has_static_batch(model), per_run)
    # targets on the same rows as the measurements: identical models get identical statistics
    stats = replace(stats, preact=stats.subset_preact(step)) if step > 1 else stats
    frontier = Frontier(model, weights, chunks, feeds, providers)
    passes = 0
    for level in levels:
        resets = [n for n in norms if not level[0] and n.level == level[1]]
        if resets:
            _reset_norms_on(frontier, weights, resets, norm_targets(resets, graphs, merges, stats))
            passes += 1
        group = [s for s in sites if (s.model >= 0, float(s.number)) == level]
        if group:
            _correct_level(model, weights, frontier, group, level[0], graphs, merges, stats)
            passes += 1
            if progress is not None:
                progress(1)
    return RepairReport(layers=len(sites) + len(norms), passes=passes, samples=rows)


def _correct_level(model, weights: Weights, frontier: Frontier, group: list, owned: bool, graphs, merges: Merges,
                   stats: PairStats) -> None:
    """Measure the layers of one level (one run from the kept activations) and correct them;
    ``owned``: branch layers, measured on their own model's rows."""
    preacts = list(dict.fromkeys(s.preact for s in group))
    counts: dict[str, int] = {}
    for s in group:
        counts[s.preact] = counts.get(s.preact, 0) + 1
    shared = {p for p, c in counts.items() if c > 1}
    restorable = {s.preact: s for s in group if _restorable(model, weights, s, shared)}
    changed = set().union(*(_site_nodes(s) for s in group))
    plan = frontier.plan(preacts, changed, {p: _site_nodes(s) for p, s in restorable.items()})
    measure = _LevelMoments(group, owned)
    fetched = frontier.execute(plan, measure)
    restored = {}
    for s in group:
        acc = measure.accs.get(measure.key(s))
        sv = None
        if acc is not None and acc.count[0] > 0:
            mean_now, var_now, _ = acc.moments([0])
            mean_t, std_t = target_statistics(s, graphs, merges, stats)
            sv, off = correct_layer(model, weights, s, mean_now, np.sqrt(var_now), mean_t, std_t)
        if s.preact in restorable:
            restored[s.preact] = (_site_nodes(s), sv, None if sv is None else off, s.channel_axis)
    frontier.commit(plan, fetched, restored)


class _LevelMoments:
    """Per-channel moments of one level's pre-activations, chunk by chunk (a branch layer on its
    own model's rows)."""

    def __init__(self, group: list, owned: bool):
        self.group, self.owned = group, owned
        self.accs: dict[tuple, SplitMoments] = {}

    def key(self, s) -> tuple:
        return (s.preact, s.model if self.owned else -1)

    def __call__(self, chunk: Chunk, values: dict) -> None:
        for s in self.group:
            mask = chunk.valid
            if self.owned and s.model >= 0 and chunk.owner is not None:
                mask = mask & chunk.owner[s.model]
            x, axis = values[s.preact], s.channel_axis
            if s.samples is not None:  # samples to axis 0 (sequence-first attention)
                x, axis = samples_first(x, s.samples, len(mask)), samples_first_axis(s.samples, axis % x.ndim)
            else:  # one row per calibration row (a dense layer on [rows * tokens, C])
                x, axis = per_row(x, axis, len(mask))
            key = self.key(s)
            if key not in self.accs:
                self.accs[key] = SplitMoments(x.shape[axis], 1)
            self.accs[key].update(x, axis, mask[None])


def norm_targets(norms, graphs, merges: Merges, stats: PairStats) -> dict:
    """Per trunk BatchNormalization: the mean and std its normalized output should have, the
    sources' own (input moments on calibration data through their stored statistics), averaged
    through M: (mean_t, std_t) of ``(x - running_mean) / sqrt(running_var)``. Nodes without
    measured input moments are left out (plain reset)."""
    out = {}
    for n in norms:
        per_model = stats.preact.get(f"norm:{n.node}")
        node_a = graphs[0].nodes_by_name.get(n.node)
        space = graphs[0].spaces.get(n.input)
        if per_model is None or node_a is None or space is None:
            continue
        index = [p.node for p in graphs[0].params if p.op_type == "BatchNormalization"]
        index = list(dict.fromkeys(index)).index(n.node)
        mean_t = std_t = 0.0
        for k, (m, v) in enumerate(per_model):
            nodes = list(dict.fromkeys(p.node for p in graphs[k].params if p.op_type == "BatchNormalization"))
            node = graphs[k].nodes_by_name[nodes[index]]
            inits = {t.name: t for t in graphs[k].model.graph.initializer}
            mu = numpy_helper.to_array(inits[node.input[3]]).astype(np.float64).reshape(-1)
            var = numpy_helper.to_array(inits[node.input[4]]).astype(np.float64).reshape(-1)
            scale = np.sqrt(np.maximum(var, _EPS))  # (epsilon is the node's own business)
            mk = merges.merge(space, k)
            mean_t = mean_t + mk @ ((m - mu) / scale)
            std_t = std_t + mk @ (np.sqrt(np.maximum(v, 0.0)) / scale)
        out[n.node] = (mean_t, std_t)
    return out


def _reset_norms_on(frontier: Frontier, weights: Weights, norms, targets: dict | None = None) -> None:
    """BatchNormalization reset: running mean and variance from the merged model's statistics.

    The paper resets them to the merged model's input moments on the data. With ``targets``
    (see :func:`norm_targets`) they are set so that the normalized output has the sources'
    averaged moments instead: the same as the reset where the sources' stored statistics are
    their inputs' moments on this data, and no change at all on a model zipped with itself.
    """
    names = list(dict.fromkeys(n.input for n in norms))
    plan = frontier.plan(names, {n.node for n in norms}, {})
    accs: dict[str, SplitMoments] = {}

    def measure(chunk: Chunk, values: dict) -> None:
        for name in names:
            x = values[name]
            accs.setdefault(name, SplitMoments(x.shape[1], 1)).update(x, 1, chunk.valid[None])

    fetched = frontier.execute(plan, measure)
    for n in norms:
        acc_mean, acc_var, _ = accs[n.input].moments([0])
        mean, var = weights.get(n.mean), weights.get(n.var)
        if targets and n.node in targets:
            # (x - mean) / sqrt(var) gets the targets' mean and std on the merged model's x
            mean_t, std_t = targets[n.node]
            std_now = np.sqrt(np.maximum(acc_var, 0.0))
            old_scale = np.sqrt(np.maximum(var.astype(np.float64).reshape(-1), 0.0))
            ok = (std_t > _EPS) & (std_now > _EPS)
            scale = np.where(ok, std_now / np.where(ok, std_t, 1.0), old_scale)
            acc_mean = acc_mean - mean_t * scale
            acc_var = scale ** 2
        weights.set(n.mean, acc_mean.astype(mean.dtype).reshape(mean.shape))
        weights.set(n.var, acc_var.astype(var.dtype).reshape(var.shape))
    frontier.commit(plan, fetched, {})
