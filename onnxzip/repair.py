"""Statistics correction after merging (REPAIR, Jordan et al., ICLR 2023; method.md).

Merging averages features, which shrinks and shifts their distribution; exported models have
BatchNorm folded into their weights, so it cannot simply be reset. For every zipped layer, in
topological order (one pass over the calibration data per level of the layer graph), the merged
model's per-channel pre-activation mean and std are measured on all calibration data and the
layer's weights and bias are rescaled so they match the source models' statistics there,
averaged through the merge matrix (each model's statistics from its own task's samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.merge import Merges
from onnxzip.split import LayerSite, ZipLayout
from onnxzip.stats.accumulate import MomentAccumulator, as_samples
from onnxzip.stats.collect import PairStats, fetch_model, make_session

__all__ = ["RepairReport", "repair", "target_statistics", "correct_layer"]

_EPS = 1e-8
_MAX_SCALE = 1e4


@dataclass
class RepairReport:
    layers: int
    passes: int
    samples: int


def target_statistics(site: LayerSite, graphs, merges: Merges, stats: PairStats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std the merged layer should have: the sources' own, averaged through M."""
    per_model = stats.preact[site.index]
    if site.model >= 0:
        mean, var = per_model[site.model]
        return mean, np.sqrt(var)
    gid = graphs[0].layers[site.index].out_space.gid
    mean = np.zeros(merges[gid].merge.shape[0])
    std = np.zeros_like(mean)
    for k, (m, v) in enumerate(per_model):
        mk = merges[gid].merge_of(k)
        mean += mk @ m
        std += mk @ np.sqrt(v)
    return mean, std


class _Weights:
    """Initializers of a model by name, edited in place."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.index = {t.name: k for k, t in enumerate(model.graph.initializer)}

    def get(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.model.graph.initializer[self.index[name]])

    def set(self, name: str, value: np.ndarray) -> None:
        t = numpy_helper.from_array(value, name)
        if name in self.index:
            self.model.graph.initializer[self.index[name]].CopyFrom(t)
        else:
            self.index[name] = len(self.model.graph.initializer)
            self.model.graph.initializer.append(t)


def _scale_along(x: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * s.reshape(shape)


def correct_layer(model: onnx.ModelProto, weights: _Weights, site: LayerSite, mean_now, std_now, mean_t, std_t) -> None:
    """Rescale a layer so its pre-activation has mean ``mean_t`` and std ``std_t``."""
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
        return
    if site.chain:
        _, init, axis, sign = site.chain[0]
        c = weights.get(init)
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
    else:  # MatMul: add the bias after it
        out = node.output[0]
        node.output[0] = out + "/pre_bias"
        add = helper.make_node("Add", [out + "/pre_bias", name], [out], name=site.node + "/repair_bias")
        idx = list(model.graph.node).index(node)
        model.graph.node.insert(idx + 1, add)
        weights.set(name, offset.astype(w.dtype))
    site.bias = name if node.op_type in ("Conv", "Gemm") else None
    if site.bias is None:
        site.chain = [(site.node + "/repair_bias", name, 0, 1.0)]


def _only_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that computes only ``names`` (so a pass runs just what it needs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    needed = set(names)
    keep = []
    for n in reversed(list(m.graph.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del m.graph.node[:]
    m.graph.node.extend(reversed(keep))
    inits = [t for t in m.graph.initializer if t.name in needed]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m


def _measure(model: onnx.ModelProto, sites: list[LayerSite], batches, providers, owners=None) -> dict:
    names = list(dict.fromkeys(s.preact for s in sites))
    sess = make_session(_only_outputs(model, names), providers)
    accs = {s.preact: None for s in sites}
    inputs = [i.name for i in sess.get_inputs()]
    for b, batch in enumerate(batches()):
        feeds = {n: batch.feeds[n] for n in inputs}
        outs = dict(zip(names, sess.run(names, feeds)))
        owned = owners[b] if owners is not None else None
        for s in sites:
            rows = as_samples(outs[s.preact], s.channel_axis)
            if accs[s.preact] is None:
                accs[s.preact] = MomentAccumulator(rows.shape[-1])
            w = batch.valid.astype(np.float64)
            if owned is not None and s.model >= 0:
                w = w * owned[s.model]
            accs[s.preact].update(rows, w)
    return accs


def repair(model: onnx.ModelProto, layout: ZipLayout, graphs, merges: Merges, stats: PairStats, batches,
           providers=None, heads: bool = True, progress=None) -> RepairReport:
    """Correct the zipped model in place; ``batches()`` yields calibration batches afresh.

    With ``heads``, layers inside each task's branch are corrected too, toward their own
    model's statistics on its own task's samples (a branch reads merged features through its
    unmerge, whose statistics are the cluster's average, not its model's own). Layers that
    write a task's outputs (logits) are left as they are.
    """
    weights = _Weights(model)
    owners = stats.owners
    norms = list(layout.norm_sites)
    sites = [
        s for s in layout.sites
        if s.model == -1 or (heads and not graphs[s.model].groups[graphs[s.model].layers[s.index].out_space.gid].output)
    ]
    levels = sorted({(s.model >= 0, float(s.number)) for s in sites} | {(False, n.level) for n in norms})
    passes = 0
    for level in levels:
        resets = [n for n in norms if not level[0] and n.level == level[1]]
        if resets:
            _reset_norms(model, weights, resets, batches, providers)
        group = [s for s in sites if (s.model >= 0, float(s.number)) == level]
        if not group:
            passes += bool(resets)
            continue
        accs = _measure(model, group, batches, providers, owners if level[0] else None)
        passes += 1
        for s in group:
            acc = accs[s.preact]
            if acc is None or acc.count == 0:
                continue
            mean_t, std_t = target_statistics(s, graphs, merges, stats)
            correct_layer(model, weights, s, acc.mean, np.sqrt(acc.var), mean_t, std_t)
        if progress is not None:
            progress(1)
    return RepairReport(layers=len(sites) + len(norms), passes=passes, samples=stats.samples)


def _reset_norms(model, weights: _Weights, norms, batches, providers) -> None:
    """BatchNormalization reset: running mean and variance measured on the merged model (the paper)."""
    names = list(dict.fromkeys(n.input for n in norms))
    sess = make_session(_only_outputs(model, names), providers)
    inputs = [i.name for i in sess.get_inputs()]
    accs = {}
    for batch in batches():
        outs = dict(zip(names, sess.run(names, {n: batch.feeds[n] for n in inputs})))
        for name, value in outs.items():
            rows = as_samples(value, 1)
            accs.setdefault(name, MomentAccumulator(rows.shape[-1])).update(rows, batch.valid.astype(np.float64))
    for n in norms:
        acc = accs[n.input]
        mean, var = weights.get(n.mean), weights.get(n.var)
        weights.set(n.mean, acc.mean.astype(mean.dtype).reshape(mean.shape))
        weights.set(n.var, acc.var.astype(var.dtype).reshape(var.shape))
