"""collect_stats(): run both models in lockstep and stream the statistics the zip needs.

Per feature group: mean and 2F x 2F covariance of the concatenated features [f_A ; f_B] over
all calibration samples (every spatial position or token is a sample; float64). Per weight
layer: each model's per-channel pre-activation mean and variance on its *own* task's samples,
the targets of the statistics correction (method.md, "Statistics after merging"). When the data
is not labeled by task, each sample goes to the model whose head is the most confident on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxzip.graph.layergraph import LayerGraph
from onnxzip.stats.accumulate import CovarianceAccumulator, MomentAccumulator, as_samples

__all__ = ["PairStats", "collect_stats", "make_session", "fetch_model", "owner_masks"]


@dataclass
class GroupStats:
    mean: np.ndarray
    covariance: np.ndarray
    count: float


@dataclass
class PairStats:
    """Statistics of a pair of models on calibration data."""

    groups: dict[int, GroupStats]
    preact: dict[int, list[tuple[np.ndarray, np.ndarray]]]  # layer index -> per model (mean, var)
    samples: int
    assigned: list[int]  # samples whose target statistics went to each model
    batches: int = 0
    owners: list = field(default_factory=list)  # per batch: [models, rows] bool, see owner_masks


def fetch_model(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A shallow copy of ``model`` that also outputs the tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


def make_session(model: onnx.ModelProto, providers=None, optimize: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers or ["CPUExecutionProvider"])


# Confidences closer than this are a tie: the sample informs both models (identical models
# then get identical targets, so correcting a model zipped with itself changes nothing).
TIE_TOLERANCE = 1e-5


def owner_masks(batch, head_outputs: list[np.ndarray]) -> np.ndarray:
    """[models, rows] bool: which model's target statistics each row informs.

    Rows labeled by task go to that task's model; unlabeled rows go to the model whose own
    head is the most confident on them (method.md), ties to all tied models.
    """
    n = len(head_outputs)
    if (batch.task >= 0).all():
        return np.stack([batch.task == k for k in range(n)])
    conf = np.stack([_softmax_confidence(o) for o in head_outputs])
    return conf >= conf.max(axis=0, keepdims=True) - TIE_TOLERANCE


def _softmax_confidence(logits: np.ndarray) -> np.ndarray:
    z = logits.reshape(logits.shape[0], -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True)).max(axis=1)


def collect_stats(
    graphs: list[LayerGraph],
    batches,
    providers=None,
    progress=None,
) -> PairStats:
    """Stream statistics of two models over ``batches`` (from :meth:`DataSet.batches`).

    ``graphs[k].layers[i]`` correspond across models, as do measurement points; the batches'
    feeds are keyed by the first model's input names and mapped by position to the others.
    """
    n_models = len(graphs)
    base = graphs[0]
    points = [g.measure_points() for g in graphs]
    fetch = []
    for k, g in enumerate(graphs):
        names = [p.tensor for p in points[k]] + [l.preact for l in g.layers]
        fetch.append(names)
    sessions = [make_session(fetch_model(g.model, fetch[k] + g.outputs[:1]), providers) for k, g in enumerate(graphs)]
    group_acc: dict[int, CovarianceAccumulator] = {}
    for p in points[0]:
        size = base.groups[p.gid].size
        group_acc.setdefault(p.gid, CovarianceAccumulator(n_models * size))
    preact_acc = {i: [MomentAccumulator(l.out_channels) for _ in graphs] for i, l in enumerate(base.layers)}
    # fallback when a model is assigned no samples at all: its statistics on all the data
    preact_all = {i: [MomentAccumulator(l.out_channels) for _ in graphs] for i, l in enumerate(base.layers)}
    samples, assigned, n_batches = 0, [0] * n_models, 0
    owners = []
    for batch in batches:
        outs = []
        for k, (g, sess) in enumerate(zip(graphs, sessions)):
            feeds = {name: batch.feeds[base.inputs[j]] for j, name in enumerate(g.inputs)}
            names = fetch[k] + g.outputs[:1]
            outs.append(dict(zip(names, sess.run(names, feeds))))
        valid = batch.valid.astype(np.float64)
        owner = owner_masks(batch, [outs[k][g.outputs[0]] for k, g in enumerate(graphs)])
        owners.append(owner)
        for k in range(n_models):
            assigned[k] += int((owner[k] & batch.valid).sum())
        for j, p in enumerate(points[0]):
            blocks = [as_samples(outs[k][points[k][j].tensor], points[k][j].axis) for k in range(n_models)]
            group_acc[p.gid].update(np.concatenate(blocks, axis=-1), valid)
        for i, layer in enumerate(base.layers):
            for k, g in enumerate(graphs):
                l = g.layers[i]
                axis = _channel_axis(g, l)
                w = valid * owner[k]
                rows = as_samples(outs[k][l.preact], axis)
                preact_acc[i][k].update(rows, w)
                preact_all[i][k].update(rows, valid)
        samples += int(batch.valid.sum())
        n_batches += 1
        if progress is not None:
            progress(int(batch.valid.sum()))
    groups = {gid: GroupStats(a.mean, a.covariance, a.count) for gid, a in group_acc.items()}
    preact = {
        i: [(a.mean, a.var) if a.count > 0 else (b.mean, b.var) for a, b in zip(accs, preact_all[i])]
        for i, accs in preact_acc.items()
    }
    return PairStats(groups, preact, samples, assigned, n_batches, owners)


def _channel_axis(graph: LayerGraph, layer) -> int:
    from onnxzip.graph.spaces import GroupSpace

    space = graph.spaces.get(layer.preact)
    if isinstance(space, GroupSpace):
        return space.axis
    return layer.out_space.axis if isinstance(layer.out_space, GroupSpace) else 1
