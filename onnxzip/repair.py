"""Statistics correction after merging (REPAIR, Jordan et al., ICLR 2023; method.md).

Merging averages features, which shrinks and shifts their distribution; exported models have
BatchNorm folded into their weights, so it cannot simply be reset. For every zipped layer, in
topological order (one level of the layer graph at a time), the merged model's per-channel
pre-activation mean and std are measured on calibration data and the layer's weights and bias
are rescaled so they match the source models' statistics there, averaged through the merge
matrix (each model's statistics from its own task's samples, on the same rows).

Each level runs only the nodes between the activations earlier levels left behind and its own
layers (see ``_Frontier``), so the whole correction costs about one forward pass of the merged
model. Large calibration sets are measured on an evenly spread subset of rows (see
:func:`repair`), which bounds the memory those kept activations take.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.errors import InternalError
from onnxzip.graph.spaces import leaves
from onnxzip.merge import Merges
from onnxzip.split import LayerSite, ZipLayout
from onnxzip.stats.accumulate import SplitMoments
from onnxzip.runtime import session
from onnxzip.stats.collect import PairStats, has_static_batch, subset_step

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

# Activations of one run of a level's sub-model are kept under about this many bytes (the rows
# per run follow from the statistics pass's measured activation size).
RUN_BUDGET_BYTES = 256 << 20


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


def correct_layer(model: onnx.ModelProto, weights: _Weights, site: LayerSite, mean_now, std_now, mean_t, std_t):
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
        return s, offset
    if site.chain:
        _, init, axis, sign = site.chain[0]
        c = weights.get(init)
        shape = [1] * c.ndim
        shape[axis] = -1
        weights.set(init, (c.astype(np.float64) + sign * offset.reshape(shape)).astype(c.dtype))
        return s, offset
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
    return s, offset


# ---------------------------------------------------------------------------------------------
# Calibration rows the correction runs on, and the activations it keeps between levels.
#
# A level's pass used to run the merged model from its inputs up to that level's layers, over
# all calibration data: about (levels / 2) full forward passes in all. Here each level runs only
# the nodes between what earlier levels left behind (the "frontier": the tensors that nodes not
# yet run still read) and its own layers' pre-activations. After a layer is corrected its
# pre-activation is updated in place (the correction is a per-channel affine map of it), so no
# node runs twice: the whole correction costs about one forward pass of the merged model over
# the rows it uses. Those rows are a fixed, evenly spread subset of the calibration data (at most
# ``max_samples``), so memory is bounded by the frontier of that subset, whatever the size of
# the calibration set.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    valid: np.ndarray  # bool per row (False: padding)
    owner: np.ndarray | None  # [models, rows] bool, which model's targets each row informs


def default_repair_samples(stats: PairStats) -> int:
    """How many rows the correction measures on by default: up to :data:`REPAIR_SAMPLES`, fewer
    when their kept activations would not fit :data:`FRONTIER_BUDGET_BYTES` (at least MIN_REPAIR_SAMPLES)."""
    per_row = 3 * getattr(stats, "largest_activation_bytes", 0.0)
    fit = int(FRONTIER_BUDGET_BYTES // per_row) if per_row else REPAIR_SAMPLES
    return min(REPAIR_SAMPLES, max(MIN_REPAIR_SAMPLES, fit))


def _subset(batches, owners, step: int, static: bool, max_chunk: int | None = None) -> tuple[list[_Chunk], dict, int]:
    """The valid calibration rows whose index (among valid rows, in batch order) is a multiple of
    ``step``, in chunks of the batch size (at most ``max_chunk`` rows when the batch axis is dynamic).

    Returns the chunks, the feeds (input name -> list of arrays, one per chunk) and the number of rows.
    """
    chunks: list[_Chunk] = []
    feeds: dict[str, list] = {}
    pend: dict[str, list] = {}
    pend_owner: list = []
    pend_n = 0
    size = None
    seen = taken = 0
    have_owner = True

    def emit(n: int) -> None:
        nonlocal pend_n
        cat = {k: np.concatenate(v) for k, v in pend.items()}
        own = np.concatenate(pend_owner, axis=1) if have_owner and pend_owner else None
        rows = min(n, pend_n)
        valid = np.zeros(n if static else rows, dtype=bool)
        valid[:rows] = True
        for k, v in cat.items():
            part = v[:rows]
            if static and rows < n:
                part = np.concatenate([part, np.zeros((n - rows,) + part.shape[1:], dtype=part.dtype)])
            feeds.setdefault(k, []).append(np.ascontiguousarray(part))
            pend[k] = [v[rows:]]
        o = None
        if own is not None:
            o = np.zeros((own.shape[0], len(valid)), dtype=bool)
            o[:, :rows] = own[:, :rows]
            pend_owner[:] = [own[:, rows:]]
        chunks.append(_Chunk(valid, o))
        pend_n -= rows

    for b, batch in enumerate(batches()):
        if size is None:
            size = len(batch.valid)
            if max_chunk is not None and not static:
                size = max(1, min(size, max_chunk))
        idx = np.flatnonzero(batch.valid)
        pos = seen + np.arange(len(idx))
        seen += len(idx)
        sel = idx[pos % step == 0]
        if len(sel):
            for k, v in batch.feeds.items():
                pend.setdefault(k, []).append(np.asarray(v)[sel])
            if owners is not None and b < len(owners):
                pend_owner.append(np.asarray(owners[b])[:, sel])
            else:
                have_owner = False
            taken += len(sel)
            pend_n += len(sel)
            while pend_n >= size:
                emit(size)
    if pend_n > 0:
        emit(size)
    return chunks, feeds, taken


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs (If, Loop, Scan) read."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            inner = {t.name for t in g.initializer} | {i.name for i in g.input}
            for n in g.node:
                for i in _node_inputs(n):
                    if i not in inner:
                        names.append(i)
                inner.update(n.output)
    return names


_NP_TO_ONNX = {np.dtype(k): v for k, v in {
    np.float32: onnx.TensorProto.FLOAT, np.float64: onnx.TensorProto.DOUBLE, np.float16: onnx.TensorProto.FLOAT16,
    np.int64: onnx.TensorProto.INT64, np.int32: onnx.TensorProto.INT32, np.int8: onnx.TensorProto.INT8,
    np.uint8: onnx.TensorProto.UINT8, np.bool_: onnx.TensorProto.BOOL,
}.items()}


@dataclass
class _Plan:
    targets: list[str]
    closure: list  # NodeProtos to run, in graph order
    fetch: list[str]  # tensors the sub-model returns
    inputs: list[str]  # cached tensors it reads
    post: set  # nodes whose outputs stay valid after this level's corrections (before restoring)
    free: list = field(default_factory=list)  # kept tensors nothing reads after this level


class _Frontier:
    """The activations of the repair rows that nodes not yet run still need, kept between levels."""

    def __init__(self, model: onnx.ModelProto, weights: _Weights, chunks: list[_Chunk], feeds: dict, providers):
        self.model = model
        self.weights = weights
        self.chunks = chunks
        self.providers = providers
        self.values: dict[str, list] = {i.name: feeds[i.name] for i in model.graph.input if i.name in feeds}
        self.done: set[str] = set()
        # the repair edits initializers only: the graph's wiring is fixed
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, set[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        for n in model.graph.node:
            self.outputs[n.name] = [o for o in n.output if o]
            for o in self.outputs[n.name]:
                self.producer[o] = n
            for i in _node_inputs(n):
                self.consumers.setdefault(i, set()).add(n.name)

    def plan(self, targets: list[str], changed: set[str], restored: dict[str, set[str]]) -> _Plan:
        """What to run to measure ``targets``.

        ``changed``: nodes whose weights this level will edit; ``restored``: preact -> the nodes
        that compute it from their inputs, for the layers whose corrected pre-activation is
        updated in place (so their nodes stay valid).
        """
        producer, consumers = self.producer, self.consumers
        inits = self.weights.index
        closure: set[str] = set()
        stack = list(targets)
        while stack:
            t = stack.pop()
            if not t or t in self.values or t in inits:
                continue
            n = producer.get(t)
            if n is None:
                raise InternalError(f"repair: no node computes '{t}'")
            if n.name in closure:
                continue
            closure.add(n.name)
            stack.extend(_node_inputs(n))
        computed = self.done | closure
        keep = set().union(*restored.values()) if restored else set()
        stale: set[str] = set()
        frontier = [n for n in changed if n not in keep]
        stale.update(frontier)
        seeds = [o for n in self.model.graph.node if n.name in stale for o in n.output]
        seeds += list(restored)
        seen = set()
        while seeds:
            t = seeds.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in consumers.get(t, ()):
                if c not in stale:
                    stale.add(c)
                    seeds.extend(self.outputs.get(c, []))
        stale &= computed
        post = computed - stale
        nodes = [n for n in self.model.graph.node if n.name in closure]
        produced = {o for n in nodes for o in n.output if o}
        fetch = [t for t in targets if t in produced]
        for n in nodes:
            if n.name not in post:
                continue
            for o in n.output:
                if o and o not in fetch and not consumers.get(o, set()) <= post:
                    fetch.append(o)
        inputs = []
        for n in nodes:
            for i in _node_inputs(n):
                if i and i not in produced and i not in inits and i not in inputs:
                    inputs.append(i)
        missing = [i for i in inputs if i not in self.values]
        if missing:
            raise InternalError(f"repair: tensors {missing} are neither kept nor computable")
        free = [i for i in inputs if i not in targets and consumers.get(i, set()) <= post]
        return _Plan(list(targets), nodes, fetch, inputs, post, free)

    def _session(self, plan: _Plan):
        graph_inputs = []
        for i in plan.inputs:
            v = self.values[i][0]
            graph_inputs.append(helper.make_tensor_value_info(i, _NP_TO_ONNX[v.dtype], [None] + list(v.shape[1:])))
        names = {i for n in plan.closure for i in _node_inputs(n)}
        inits = [self.model.graph.initializer[self.weights.index[n]] for n in names if n in self.weights.index]
        graph = helper.make_graph(plan.closure, "repair_level", graph_inputs,
                                  [helper.make_empty_tensor_value_info(o) for o in plan.fetch], initializer=inits)
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        return session(sub, self.providers, optimization="all", arena=False, spinning=False)

    def execute(self, plan: _Plan, on_chunk) -> dict[str, list]:
        """Run the plan on every chunk; ``on_chunk(chunk, values)`` sees the targets' values."""
        sess = self._session(plan) if plan.closure else None
        fetched: dict[str, list] = {o: [] for o in plan.fetch}
        for c, chunk in enumerate(self.chunks):
            outs = {}
            if sess is not None:
                res = sess.run(plan.fetch, {i: self.values[i][c] for i in plan.inputs})
                outs = dict(zip(plan.fetch, res))
                for o in plan.fetch:
                    fetched[o].append(outs[o])
            on_chunk(chunk, {t: outs[t] if t in outs else self.values[t][c] for t in plan.targets})
            for i in plan.free:  # release each chunk as soon as it is used: old and new frontier overlap by one chunk
                self.values[i][c] = None
        return fetched

    def commit(self, plan: _Plan, fetched: dict[str, list], restored: dict[str, tuple]) -> None:
        """Keep what later levels need, with each restored pre-activation mapped to ``s * z + offset``."""
        done = set(plan.post)
        merged = {**self.values, **fetched}
        for preact, (nodes, s, offset, axis) in restored.items():
            done.update(nodes)
            if s is not None and preact in merged:
                merged[preact] = [_affine(v, s, offset, axis) for v in merged[preact]]
        consumers = self.consumers
        producer_names = {o: n.name for o, n in self.producer.items()}
        values = {}
        for name, vals in merged.items():
            p = producer_names.get(name)
            if p is not None and p not in done:
                continue  # stale
            if consumers.get(name, set()) <= done:
                continue  # nothing left reads it
            values[name] = vals
        self.values = values
        self.done = done


def _affine(v: np.ndarray, s: np.ndarray, offset: np.ndarray, axis: int) -> np.ndarray:
    """``s * v + offset`` along ``axis``, in place when ``v`` is writable."""
    shape = [1] * v.ndim
    shape[axis] = -1
    if not v.flags.writeable:
        v = v.copy()
    v *= s.astype(v.dtype).reshape(shape)
    v += offset.astype(v.dtype).reshape(shape)
    return v


def _site_nodes(site: LayerSite) -> set[str]:
    return {site.node} | {c[0] for c in site.chain}


def _restorable(model: onnx.ModelProto, weights: _Weights, site: LayerSite, shared: set[str]) -> bool:
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
        if inner & set(_node_inputs(n)):
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
    weights = _Weights(model)
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
    chunks, feeds, rows = _subset(batches, stats.owners, step, has_static_batch(model), per_run)
    # targets on the same rows as the measurements: identical models get identical statistics
    stats = replace(stats, preact=stats.subset_preact(step)) if step > 1 else stats
    frontier = _Frontier(model, weights, chunks, feeds, providers)
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


def _correct_level(model, weights: _Weights, frontier: _Frontier, group: list, owned: bool, graphs, merges: Merges,
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

    def __call__(self, chunk: _Chunk, values: dict) -> None:
        for s in self.group:
            mask = chunk.valid
            if self.owned and s.model >= 0 and chunk.owner is not None:
                mask = mask & chunk.owner[s.model]
            x = values[s.preact]
            key = self.key(s)
            if key not in self.accs:
                self.accs[key] = SplitMoments(x.shape[s.channel_axis], 1)
            self.accs[key].update(x, s.channel_axis, mask[None])


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


def _reset_norms_on(frontier: _Frontier, weights: _Weights, norms, targets: dict | None = None) -> None:
    """BatchNormalization reset: running mean and variance from the merged model's statistics.

    The paper resets them to the merged model's input moments on the data. With ``targets``
    (see :func:`norm_targets`) they are set so that the normalized output has the sources'
    averaged moments instead: the same as the reset where the sources' stored statistics are
    their inputs' moments on this data, and no change at all on a model zipped with itself.
    """
    names = list(dict.fromkeys(n.input for n in norms))
    plan = frontier.plan(names, {n.node for n in norms}, {})
    accs: dict[str, SplitMoments] = {}

    def measure(chunk: _Chunk, values: dict) -> None:
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
