"""collect_stats(): run both models in lockstep and stream the statistics the zip needs.

Per feature group: mean and 2F x 2F covariance of the concatenated features [f_A ; f_B] over
all calibration samples (every spatial position or token is a sample; float64). Per weight
layer: each model's per-channel pre-activation mean and variance on its *own* task's samples,
the targets of the statistics correction (method.md, "Statistics after merging"). When the data
is not labeled by task, each sample goes to the model whose head is the most confident on it.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxzip.graph.layergraph import LayerGraph
from onnxzip.graph.samples import samples_first, samples_first_axis
from onnxzip.predictions import owner_masks
from onnxzip.runtime import session
from onnxzip.stats.accumulate import CovarianceAccumulator, SplitMoments, single_threaded_blas

__all__ = ["PairStats", "collect_stats", "fetch_model", "has_static_batch"]


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
    activation_bytes: float = 0.0  # bytes of activations fetched per sample and model (sizing hint)
    largest_activation_bytes: float = 0.0  # bytes per sample of the largest single activation
    # layer index -> per model SplitMoments with parts (owned, level) (see subset_preact)
    preact_parts: dict = field(default_factory=dict)
    # pre-activation moments cover only the valid rows whose index is a multiple of this
    preact_step: int = 1

    def subset_preact(self, step: int) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
        """Like ``preact``, over the rows whose index among the valid calibration rows (in
        batch order) is a multiple of ``step`` (a power of two): the rows the statistics
        correction measures on when it uses a subset, so targets and measurements match."""
        if step <= 1 or not self.preact_parts:
            return self.preact
        level = int(step).bit_length() - 1
        if (1 << level) != step or level > SUBSET_LEVELS:
            raise ValueError(f"step {step} must be a power of two up to 2**{SUBSET_LEVELS}")
        owned = [_part(True, lv) for lv in range(level, SUBSET_LEVELS + 1)]
        rest = [_part(False, lv) for lv in range(level, SUBSET_LEVELS + 1)]
        out = {}
        for i, accs in self.preact_parts.items():
            out[i] = []
            for acc in accs:
                mean, var, count = acc.moments(owned)
                if count == 0:
                    mean, var, _ = acc.moments(owned + rest)
                out[i].append((mean, var))
        return out

    def preact_on_all_rows(self, index: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Layer ``index``'s pre-activation (mean, var) per model on the same rows for every model
        (all rows the moments cover, whichever model owns them); None when not collected."""
        accs = self.preact_parts.get(index)
        if not accs:
            return None
        every = [_part(owned, lv) for owned in (True, False) for lv in range(SUBSET_LEVELS + 1)]
        return [acc.moments(every)[:2] for acc in accs]


# Row levels: the number of trailing zero bits of a row's index among the valid calibration rows
# (capped). The rows whose index is a multiple of 2**j are the rows of level >= j.
SUBSET_LEVELS = 20


def _part(owned: bool, level: int) -> int:
    return (0 if owned else SUBSET_LEVELS + 1) + level


def subset_step(total: int, limit: int | None) -> int:
    """The smallest power of two ``k`` such that every k-th of ``total`` rows gives at most ``limit``."""
    step = 1
    if limit is None:
        return step
    while -(-total // step) > limit and step < (1 << SUBSET_LEVELS):
        step *= 2
    return step


def row_levels(index: np.ndarray) -> np.ndarray:
    """Trailing zero bits of each (non-negative) row index, capped at :data:`SUBSET_LEVELS`."""
    index = np.asarray(index, dtype=np.int64)
    out = np.full(index.shape, SUBSET_LEVELS, dtype=np.int64)
    nz = index != 0
    low = index[nz] & -index[nz]
    out[nz] = np.minimum(np.round(np.log2(low)).astype(np.int64), SUBSET_LEVELS)
    return out


CHANNELS_LAST = "::onnxzip_channels_last"


def channels_last_model(model: onnx.ModelProto, wanted, shapes: dict, also=(), keep=()) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` that outputs a channel-last Transpose of each wanted feature map (and
    the tensors ``also``).

    ``wanted``: (tensor, channel axis) pairs. Returns the model and, per tensor, the name to fetch
    and its channel axis there. onnxruntime writes the transposed copy instead of the plain one
    (its blocked-layout convolutions reorder their outputs either way), and the accumulators then
    read every row's features from contiguous memory. Tensors in ``keep`` (samples not on axis 0)
    are fetched as they are.
    """
    axes: dict[str, set] = {}
    for tensor, axis in wanted:
        axes.setdefault(tensor, set()).add(axis)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    where = {}
    for tensor, options in axes.items():
        axis = next(iter(options))
        shape = shapes.get(tensor)
        rank = len(shape) if shape is not None else 0
        if len(options) > 1 or rank < 3 or axis % rank in (0, rank - 1) or tensor in keep:
            where[tensor] = (tensor, axis)
            continue
        axis %= rank
        perm = [0] + [a for a in range(1, rank) if a != axis] + [axis]
        name = tensor + CHANNELS_LAST
        m.graph.node.append(helper.make_node("Transpose", [tensor], [name], name=name, perm=perm))
        where[tensor] = (name, rank - 1)
    _add_outputs(m, [n for n, _ in where.values()] + list(also))
    return m, where


def fetch_model(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A shallow copy of ``model`` that also outputs the tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _add_outputs(m, names)
    return m


def _add_outputs(m: onnx.ModelProto, names) -> None:
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(n))
            have.add(n)


# Both models' fetched activations for one run are kept under about this many bytes: a batch
# whose activations would exceed it runs in sub-batches (models with a dynamic batch axis).
FETCH_BUDGET_BYTES = 768 << 20


def has_static_batch(model: onnx.ModelProto) -> bool:
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return True
    return False


def _sub_batch(batch, start: int, stop: int):
    from onnxzip.data import Batch

    return Batch({k: v[start:stop] for k, v in batch.feeds.items()}, batch.valid[start:stop], batch.task[start:stop])


# Covariance rows per feature that every measured tensor keeps at least (see collect_stats).
ROWS_PER_FEATURE = 128
MIN_POSITIONS = 4


def max_positions(dim: int, items: int | None, rows_per_feature: int | None) -> int | None:
    """Positions per item a covariance of ``dim`` features samples (None: all)."""
    if not rows_per_feature or not items:
        return None
    return max(MIN_POSITIONS, -(-rows_per_feature * dim // items))


def collect_stats(
    graphs: list[LayerGraph],
    batches,
    providers=None,
    progress=None,
    items: int | None = None,
    rows_per_feature: int | None = ROWS_PER_FEATURE,
    preact_rows: int | None = None,
    seed: int = 0,
    classes: list | None = None,
) -> PairStats:
    """Stream statistics of two models over ``batches`` (from :meth:`DataSet.batches`).

    Covariances of feature maps with many positions per item are estimated on a random subset
    of each item's positions: at most ``ceil(rows_per_feature * D / items)`` per item and
    measured tensor (``D``: the group's features in both models, ``items``: the calibration
    samples), so that each tensor still gives at least ``rows_per_feature * D`` rows; ``None``
    (or unknown ``items``) uses every position. A group's mean comes from the same rows as its
    covariance; pre-activation moments always use every position. ``seed`` seeds the choice of
    positions (one stream per group).

    Pre-activation moments (the statistics correction's targets) are taken on the rows the
    correction measures on: every k-th valid row, k the smallest power of two that leaves at
    most ``preact_rows`` of the ``items`` (None: all rows); see ``PairStats.preact_step``.

    ``graphs[k].layers[i]`` correspond across models, as do measurement points; the batches'
    feeds are keyed by the first model's input names and mapped by position to the others.
    Each batch runs every model once (in sub-batches when its activations would not fit
    :data:`FETCH_BUDGET_BYTES`); activations go straight into the accumulators. ``classes``: per
    model, the class embeddings an embedding output is scored against to tell which model an
    unlabeled row belongs to (see :func:`owner_masks`).
    """
    n_models = len(graphs)
    base = graphs[0]
    points = _common_points([[_pooled_point(g, p) for p in g.measure_points()] for g in graphs], graphs)
    group_acc: dict[int, CovarianceAccumulator] = {}
    for p in points[0]:
        dim = n_models * base.groups[p.gid].size
        group_acc.setdefault(p.gid, CovarianceAccumulator(dim, max_positions(dim, items, rows_per_feature),
                                                            seed=(seed, p.gid)))
    # per layer and model: the samples it owns (its targets) and the rest (fallback: all samples),
    # each split by row level (so the correction can take targets on its own subset of rows)
    preact_acc = {i: [SplitMoments(g.layers[i].out_channels, 2 * (SUBSET_LEVELS + 1)) for g in graphs]
                  for i in range(len(base.layers))}
    # BatchNormalization nodes left in the graph: the moments of their inputs, the same way (the
    # correction's targets for resetting their statistics), keyed "norm:<node of the first model>"
    for key, per_model in norm_points(graphs).items():
        size = base.shapes[per_model[0][0]][1]
        preact_acc[key] = [SplitMoments(size, 2 * (SUBSET_LEVELS + 1)) for _ in graphs]
    preact_step = subset_step(items, preact_rows) if items else 1
    stream = _Stream(graphs, points, providers, classes, norm_points(graphs))
    # one task per accumulator, each always on the same worker (so every accumulator sees its
    # updates in order: the result does not depend on the number of workers)
    stream.run(batches, _tasks(graphs, points, group_acc, preact_acc, stream.where, int(preact_step).bit_length() - 1),
               progress)
    for a in group_acc.values():
        a.release()
    groups = {gid: GroupStats(a.mean, a.covariance, a.count) for gid, a in group_acc.items()}
    return PairStats(groups, _preact_moments(preact_acc), stream.samples, stream.assigned, stream.n_batches,
                     stream.owners, stream.per_sample / max(1, n_models), stream.largest, preact_acc, preact_step)


def _common_points(points: list[list], graphs: list[LayerGraph]) -> list[list]:
    """The measurement points of groups of one size in every model (heads of different sizes,
    tasks with different numbers of classes, are never matched: no covariance for them)."""
    keep = [j for j, p in enumerate(points[0])
            if all(g.groups[pts[j].gid].size == graphs[0].groups[p.gid].size for g, pts in zip(graphs, points))]
    if len(keep) == len(points[0]):
        return points
    return [[pts[j] for j in keep] for pts in points]


def norm_points(graphs: list[LayerGraph]) -> dict[str, list[tuple[str, int]]]:
    """``"norm:<node>"`` -> per model, (input tensor, channel axis 1) of each BatchNormalization
    whose parameters follow a feature group (paired across models in the parameters' order)."""
    found = []
    for g in graphs:
        nodes = list(dict.fromkeys(p.node for p in g.params if p.op_type == "BatchNormalization"))
        found.append([(n, g.nodes_by_name[n].input[0]) for n in nodes])
    if any(len(f) != len(found[0]) for f in found):
        return {}
    return {f"norm:{found[0][j][0]}": [(f[j][1], 1) for f in found] for j in range(len(found[0]))}


def _preact_moments(preact_acc: dict) -> dict:
    """Per layer and model, (mean, var) on the rows it owns (all rows if it owns none)."""
    owned = [_part(True, lv) for lv in range(SUBSET_LEVELS + 1)]
    rest = [_part(False, lv) for lv in range(SUBSET_LEVELS + 1)]
    preact = {}
    for i, accs in preact_acc.items():
        preact[i] = []
        for acc in accs:
            mean, var, count = acc.moments(owned)
            if count == 0:  # a model assigned no samples at all: its statistics on all the data
                mean, var, _ = acc.moments(owned + rest)
            preact[i].append((mean, var))
    return preact


class _Stream:
    """The models run in lockstep over the calibration batches; their activations go to the
    accumulator tasks on worker threads while onnxruntime runs the next (sub-)batch."""

    def __init__(self, graphs: list[LayerGraph], points: list, providers, classes, norms: dict | None = None):
        self.graphs, self.classes = graphs, classes
        # the models run side by side, each on its share of the cores (no straggler waits inside an
        # op while the accumulator threads hold a core)
        threads = max(1, _worker_count(cap=64) // len(graphs))
        self.fetch, self.where, self.sessions, self.layouts = [], [], [], []
        for k, g in enumerate(graphs):
            wanted = [(p.tensor, p.axis) for p in points[k]] + [(l.preact, _channel_axis(g, l)) for l in g.layers]
            wanted += [per_model[k] for per_model in (norms or {}).values()]
            moved = {t: g.sample_layout(t) for t, _ in wanted if g.sample_layout(t)}
            model, w = channels_last_model(_with_pooled(g), wanted, g.shapes, also=g.outputs[:1], keep=moved)
            self.fetch.append(list(dict.fromkeys([n for n, _ in w.values()] + g.outputs[:1])))
            self.layouts.append({w[t][0]: layout for t, layout in moved.items()})
            for t, layout in moved.items():  # the accumulators see the samples on axis 0
                w[t] = (w[t][0], samples_first_axis(layout, w[t][1] % len(g.shapes[t])))
            self.where.append(w)
            self.sessions.append(session(model, providers, optimization="all", threads=threads, spinning=False))
        self.static = any(has_static_batch(g.model) for g in graphs)
        self.sub_rows = None  # rows per run, from the first run's activation size
        self.per_sample = self.largest = 0.0
        self.seen = self.samples = self.n_batches = 0  # seen: valid rows so far
        self.assigned = [0] * len(graphs)
        self.owners: list[np.ndarray] = []
        self.plan = None

    def run(self, batches, tasks: list, progress) -> None:
        workers = _worker_count()
        with single_threaded_blas(), _Pool(workers, depth=2) as pool, ThreadPoolExecutor(len(self.graphs)) as runner:
            for batch in batches:
                n, parts, start = len(batch.valid), [], 0
                while start < n:
                    stop = n if self.static else min(n, start + self.sub_rows if self.sub_rows else 1)
                    sub = batch if (start, stop) == (0, n) else _sub_batch(batch, start, stop)
                    parts.append(self._step(sub, max(1, stop - start), tasks, workers, pool, runner))
                    start = stop
                self.owners.append(np.concatenate(parts, axis=1))
                self.samples += int(batch.valid.sum())
                self.n_batches += 1
                if progress is not None:
                    progress(int(batch.valid.sum()))

    def _step(self, sub, rows: int, tasks: list, workers: int, pool, runner) -> np.ndarray:
        """Run every model on one (sub-)batch and hand its activations to the workers; returns
        the row owners."""
        graphs = self.graphs
        pool.reserve()
        outs = list(runner.map(lambda k: _run(self.sessions[k], graphs[k], graphs[0], self.fetch[k], sub, self.layouts[k]),
                               range(len(graphs))))
        if not self.per_sample:
            self.per_sample = sum(r.nbytes for o in outs for r in o.values()) / rows
            self.largest = max(r.nbytes for o in outs for r in o.values()) / rows
        if self.sub_rows is None and not self.static:
            # two runs' activations are alive at once (one accumulating, one running)
            self.sub_rows = max(1, int(FETCH_BUDGET_BYTES // 2 // max(1.0, self.per_sample)))
        owner = owner_masks(sub, [outs[k][g.outputs[0]] for k, g in enumerate(graphs)], self.classes)
        for k in range(len(graphs)):
            self.assigned[k] += int((owner[k] & sub.valid).sum())
        level = np.full(len(sub.valid), -1, dtype=np.int64)
        nvalid = int(sub.valid.sum())
        level[sub.valid] = row_levels(np.arange(self.seen, self.seen + nvalid))
        self.seen += nvalid
        if self.plan is None:
            self.plan = _balance(tasks, outs, workers)
        pool.submit([[(fn, outs, sub.valid, (owner, level)) for fn in self.plan[w]] for w in range(workers)])
        return owner


POOLED = "::onnxzip_pooled"


def _pooled_point(graph: LayerGraph, point):
    """A measure point averaged over another axis first (``graph.pooled``) reads the pooled tensor."""
    if point.tensor not in graph.pooled:
        return point
    from onnxzip.graph.spaces import GroupSpace

    return GroupSpace(point.gid, point.size, point.tensor + POOLED, point.axis)


def _with_pooled(graph: LayerGraph) -> onnx.ModelProto:
    """The model with a ReduceMean (keepdims) of each pooled tensor over its pooled axis."""
    if not graph.pooled:
        return graph.model
    m = onnx.ModelProto()
    m.CopyFrom(graph.model)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 18)
    for tensor, axis in graph.pooled.items():
        out = tensor + POOLED
        if opset >= 18:
            axes = out + "/axes"
            m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([axis], dtype=np.int64), axes))
            m.graph.node.append(helper.make_node("ReduceMean", [tensor, axes], [out], name=out, keepdims=1))
        else:
            m.graph.node.append(helper.make_node("ReduceMean", [tensor], [out], name=out, axes=[axis], keepdims=1))
    return m


def _run(sess, graph: LayerGraph, base: LayerGraph, names: list[str], batch, layouts: dict) -> dict:
    feeds = {name: batch.feeds[base.inputs[j]] for j, name in enumerate(graph.inputs)}
    outs = dict(zip(names, sess.run(names, feeds)))
    for name, layout in layouts.items():  # samples to axis 0 (sequence-first attention)
        outs[name] = np.ascontiguousarray(samples_first(outs[name], layout, len(batch.valid)))
    return outs


def _worker_count(cap: int | None = None) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS if cap is None else cap))


# Threads that accumulate statistics (each with a single-threaded BLAS), at most.
MAX_WORKERS = 8


def per_row(t: np.ndarray, axis: int, rows: int) -> tuple[np.ndarray, int]:
    """A tensor with one row per calibration row along axis 0, and its channel axis.

    A tensor computed once for the whole batch (a position embedding: batch axis 1) is the same
    for every row; one whose axis 0 folds the batch with the tokens (``[rows * tokens, C]``, a
    dense layer the dynamo exporter runs on a 2-D view) is unfolded, batch outermost.
    """
    axis %= max(t.ndim, 1)
    if t.ndim == 0 or t.shape[0] == rows:
        return t, axis
    if t.shape[0] == 1:
        return np.broadcast_to(t, (rows,) + t.shape[1:]), axis
    if axis != 0 and rows > 0 and t.shape[0] % rows == 0:
        return t.reshape((rows, t.shape[0] // rows) + t.shape[1:]), axis + 1
    return t, axis


def _tasks(graphs, points, group_acc, preact_acc, where, min_level: int = 0) -> list:
    """(cost function, update function) per accumulator; ``where[k]``: tensor -> (fetched name,
    channel axis) in model k's run (see :func:`channels_last_model`); pre-activation moments only
    on rows of level ``min_level`` or more."""
    n_models = len(graphs)
    tasks = []
    by_group: dict[int, list[int]] = {}
    for j, p in enumerate(points[0]):
        by_group.setdefault(p.gid, []).append(j)
    for gid, js in by_group.items():
        acc = group_acc[gid]
        blocks = [[where[k][points[k][j].tensor] for k in range(n_models)] for j in js]

        def update(outs, valid, owner, acc=acc, blocks=blocks) -> None:
            w = valid.astype(np.float64)
            for per_model in blocks:
                acc.update_blocks([per_row(outs[k][name], axis, len(w)) for k, (name, axis) in enumerate(per_model)], w)

        def cost(outs, acc=acc, blocks=blocks) -> float:
            rows = 0.0
            for per_model in blocks:
                t = outs[0][per_model[0][0]]
                positions = t.size / max(1, t.shape[0] * (acc.dim // n_models))
                rows += t.shape[0] * min(positions, acc.max_positions or positions)
            return float(acc.dim) ** 2 * rows

        tasks.append((cost, update))
    moments = {i: [g.layers[i].preact for g in graphs] for i in range(len(graphs[0].layers))}
    moments.update({key: [t for t, _ in per_model] for key, per_model in norm_points(graphs).items()})
    for i, tensors in moments.items():
        for k, g in enumerate(graphs):
            acc = preact_acc[i][k]
            name, axis = where[k][tensors[k]]

            def update(outs, valid, owner_level, acc=acc, k=k, name=name, axis=axis) -> None:
                owner, level = owner_level
                masks = np.zeros((2 * (SUBSET_LEVELS + 1), len(valid)), dtype=bool)
                rows = np.flatnonzero(valid & (level >= min_level))
                own = owner[k][rows]
                masks[np.where(own, 0, SUBSET_LEVELS + 1) + level[rows], rows] = True
                acc.update(*per_row(outs[k][name], axis, len(valid)), masks)

            def cost(outs, k=k, name=name) -> float:
                return 8.0 * outs[k][name].size

            tasks.append((cost, update))
    return tasks


def _balance(tasks, outs, workers: int) -> list[list]:
    """Tasks per worker: largest first, each to the least loaded worker."""
    costs = [(c(outs), idx) for idx, (c, _) in enumerate(tasks)]
    load = [0.0] * workers
    plan: list[list] = [[] for _ in range(workers)]
    for c, idx in sorted(costs, key=lambda t: (-t[0], t[1])):
        w = min(range(workers), key=lambda x: load[x])
        load[w] += c
        plan[w].append(idx)
    return [[tasks[idx][1] for idx in sorted(p)] for p in plan]


class _Pool:
    """Worker threads for the accumulators. Each submission is one run's activations and, per
    worker, the updates it makes from them; at most ``depth`` runs are alive (reserved, queued or
    being accumulated), so onnxruntime computes the next activations while numpy accumulates
    the previous ones (both release the GIL)."""

    _STOP = object()

    def __init__(self, workers: int, depth: int = 2):
        self.queues = [queue.Queue() for _ in range(workers)]
        self.slots = threading.Semaphore(depth)
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._loop, args=(q,), name=f"onnxzip-stats-{w}", daemon=True)
                        for w, q in enumerate(self.queues)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def _loop(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is self._STOP:
                return
            jobs, pending = item
            if self.error is None:
                try:
                    for fn, outs, valid, owner in jobs:
                        fn(outs, valid, owner)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = e
            del item, jobs
            with self.lock:
                pending[0] -= 1
                done = pending[0] == 0
            if done:
                self.slots.release()

    def reserve(self) -> None:
        self.slots.acquire()
        self._raise()

    def submit(self, per_worker: list[list]) -> None:
        busy = [w for w, jobs in enumerate(per_worker) if jobs]
        if not busy:
            self.slots.release()
            return
        pending = [len(busy)]
        for w in busy:
            self.queues[w].put((per_worker[w], pending))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def __exit__(self, exc_type, exc, tb):
        for q in self.queues:
            q.put(self._STOP)
        for t in self.threads:
            t.join()
        if exc_type is None:
            self._raise()
        return False


def _channel_axis(graph: LayerGraph, layer) -> int:
    from onnxzip.graph.spaces import GroupSpace

    space = graph.spaces.get(layer.preact)
    out = layer.out_space
    if isinstance(space, GroupSpace) and not (isinstance(out, GroupSpace) and out.gid != space.gid):
        return space.axis
    # the tensor carries another group (a token-mixing layer's output carries the channels)
    return out.axis if isinstance(out, GroupSpace) else 1
