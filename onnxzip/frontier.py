"""The activations the level-by-level passes over the zipped model keep (the statistics correction,
:mod:`onnxzip.repair`, and the least-squares refit, :mod:`onnxzip.refit`).

A level's pass runs only the nodes between the tensors earlier levels left behind (the "frontier":
what nodes not yet run still read) and its own targets, on a fixed, evenly spread subset of the
calibration rows, so all levels together cost about one forward pass of the zipped model and memory
is bounded by the frontier of that subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.errors import InternalError
from onnxzip.runtime import session

__all__ = ["Weights", "Chunk", "subset_rows", "node_inputs", "FrontierPlan", "Frontier", "affine", "RUN_BUDGET_BYTES"]

# Activations of one run of a level's sub-model are kept under about this many bytes (the rows
# per run follow from the statistics pass's measured activation size).
RUN_BUDGET_BYTES = 256 << 20


class Weights:
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
class Chunk:
    valid: np.ndarray  # bool per row (False: padding)
    owner: np.ndarray | None  # [models, rows] bool, which model's targets each row informs


def subset_rows(batches, owners, step: int, static: bool, max_chunk: int | None = None) -> tuple[list[Chunk], dict, int]:
    """The valid calibration rows whose index (among valid rows, in batch order) is a multiple of
    ``step``, in chunks of the batch size (at most ``max_chunk`` rows when the batch axis is dynamic).

    Returns the chunks, the feeds (input name -> list of arrays, one per chunk) and the number of rows.
    """
    chunks: list[Chunk] = []
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
        chunks.append(Chunk(valid, o))
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


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs (If, Loop, Scan) read."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            inner = {t.name for t in g.initializer} | {i.name for i in g.input}
            for n in g.node:
                for i in node_inputs(n):
                    if i not in inner:
                        names.append(i)
                inner.update(n.output)
    return names


NP_TO_ONNX = {np.dtype(k): v for k, v in {
    np.float32: onnx.TensorProto.FLOAT, np.float64: onnx.TensorProto.DOUBLE, np.float16: onnx.TensorProto.FLOAT16,
    np.int64: onnx.TensorProto.INT64, np.int32: onnx.TensorProto.INT32, np.int8: onnx.TensorProto.INT8,
    np.uint8: onnx.TensorProto.UINT8, np.bool_: onnx.TensorProto.BOOL,
}.items()}


@dataclass
class FrontierPlan:
    targets: list[str]
    closure: list  # NodeProtos to run, in graph order
    fetch: list[str]  # tensors the sub-model returns
    inputs: list[str]  # cached tensors it reads
    post: set  # nodes whose outputs stay valid after this level's corrections (before restoring)
    free: list = field(default_factory=list)  # kept tensors nothing reads after this level


class Frontier:
    """The activations of the repair rows that nodes not yet run still need, kept between levels."""

    def __init__(self, model: onnx.ModelProto, weights: Weights, chunks: list[Chunk], feeds: dict, providers):
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
            for i in node_inputs(n):
                self.consumers.setdefault(i, set()).add(n.name)

    def plan(self, targets: list[str], changed: set[str], restored: dict[str, set[str]]) -> FrontierPlan:
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
            stack.extend(node_inputs(n))
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
            for i in node_inputs(n):
                if i and i not in produced and i not in inits and i not in inputs:
                    inputs.append(i)
        missing = [i for i in inputs if i not in self.values]
        if missing:
            raise InternalError(f"repair: tensors {missing} are neither kept nor computable")
        free = [i for i in inputs if i not in targets and consumers.get(i, set()) <= post]
        return FrontierPlan(list(targets), nodes, fetch, inputs, post, free)

    def _session(self, plan: FrontierPlan):
        graph_inputs = []
        for i in plan.inputs:
            v = self.values[i][0]
            # rows on axis 0, except where a dimension differs between chunks (samples elsewhere:
            # sequence-first attention) or the value has no axis (a shape computation's scalar)
            dims = [None] + list(v.shape[1:]) if v.ndim else []
            for other in self.values[i][1:]:
                if other is not None:
                    dims = [d if d == e else None for d, e in zip(dims, (None,) + other.shape[1:])]
            graph_inputs.append(helper.make_tensor_value_info(i, NP_TO_ONNX[v.dtype], dims))
        names = {i for n in plan.closure for i in node_inputs(n)}
        inits = [self.model.graph.initializer[self.weights.index[n]] for n in names if n in self.weights.index]
        graph = helper.make_graph(plan.closure, "repair_level", graph_inputs,
                                  [helper.make_empty_tensor_value_info(o) for o in plan.fetch], initializer=inits)
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        return session(sub, self.providers, optimization="all", arena=False, spinning=False)

    def execute(self, plan: FrontierPlan, on_chunk) -> dict[str, list]:
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

    def commit(self, plan: FrontierPlan, fetched: dict[str, list], restored: dict[str, tuple]) -> None:
        """Keep what later levels need, with each restored pre-activation mapped to ``s * z + offset``."""
        done = set(plan.post)
        merged = {**self.values, **fetched}
        for preact, (nodes, s, offset, axis) in restored.items():
            done.update(nodes)
            if s is not None and preact in merged:
                merged[preact] = [affine(v, s, offset, axis) for v in merged[preact]]
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


def affine(v: np.ndarray, s: np.ndarray, offset: np.ndarray, axis: int) -> np.ndarray:
    """``s * v + offset`` along ``axis``, in place when ``v`` is writable."""
    shape = [1] * v.ndim
    shape[axis] = -1
    if not v.flags.writeable:
        v = v.copy()
    v *= s.astype(v.dtype).reshape(shape)
    v += offset.astype(v.dtype).reshape(shape)
    return v


