"""build_zipped_model(): one ONNX graph with a shared, zipped trunk and one branch per task.

The trunk is the first model's graph up to the zip depth, with merged weights (method.md,
"Applying the matches"): W* = sum_k M_k,out W_k U_k,in, per-channel parameters p* = sum_k M_k p_k.
After the depth, each model keeps its own remaining nodes, renamed ``<task>/...``. A feature
tensor that crosses from the trunk into a branch goes through that model's unmerge: folded into
the branch's weight layer when a weight layer reads it, else an explicit Gather on the channel
axis (the unmerge of a 0/1 match is a selection of channels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.errors import ArchitectureMismatchError, InternalError
from onnxzip.graph.build import static_batch_of
from onnxzip.graph.layergraph import Layer, LayerGraph
from onnxzip.graph.spaces import GroupSpace, InputSpace, NoFeatures, leaves
from onnxzip.merge import Merges
from onnxzip.onnx_nodes import attrs, prune

__all__ = ["ZipLayout", "LayerSite", "build_zipped_model", "branch_nodes"]


@dataclass
class LayerSite:
    """Where a weight layer of the zipped model lives, for the statistics correction."""

    index: int  # index into the layer graphs' (common) layer list
    model: int  # -1 for a trunk layer, else the model whose branch holds it
    node: str
    weight: str
    bias: str | None
    out_axis: int
    preact: str
    channel_axis: int
    chain: list = field(default_factory=list)  # (node, initializer, axis, sign)
    number: int = 0
    samples: tuple | None = None  # where the pre-activation holds its samples, if not on axis 0


@dataclass
class ZipLayout:
    stop_at: int
    tasks: list[str]
    trunk_layers: list[int]
    sites: list[LayerSite]
    outputs: dict[str, list[str]]  # task -> output names in the zipped model
    unmerge_nodes: int = 0
    folded_unmerges: int = 0
    norm_sites: list = field(default_factory=list)  # trunk BatchNormalization nodes to reset


@dataclass
class NormSite:
    """A BatchNormalization left in the trunk: its statistics are reset after merging."""

    node: str
    input: str
    mean: str
    var: str
    level: float  # corrected after the layers numbered below it


def branch_nodes(graph: LayerGraph, trunk_layer_nodes: set[str]) -> set[str]:
    """Names of the nodes that depend on a weight layer outside the trunk."""
    layer_nodes = {l.node for l in graph.layers}
    tainted_tensors: set[str] = set()
    out: set[str] = set()
    for n in graph.model.graph.node:
        if (n.name in layer_nodes and n.name not in trunk_layer_nodes) or any(i in tainted_tensors for i in n.input):
            out.add(n.name)
            tainted_tensors.update(n.output)
    return out


def _as_out_in(w: np.ndarray, out_axis: int, in_axis: int) -> np.ndarray:
    return np.moveaxis(w, (out_axis, in_axis), (0, 1))


def _from_out_in(w: np.ndarray, out_axis: int, in_axis: int) -> np.ndarray:
    return np.moveaxis(w, (0, 1), (out_axis, in_axis))


def merged_layer(layers: list[Layer], weights: list[np.ndarray], biases: list[np.ndarray | None],
                 merges: Merges) -> tuple[np.ndarray, np.ndarray | None]:
    """W* = sum_k M_k,out W_k U_k,in and b* = sum_k M_k,out b_k (method.md).

    A depthwise Conv is per channel (W* = M W); a grouped Conv's weight holds each output block's
    kernels over its own input block, and the merges are block diagonal over those blocks: the
    rule applies block by block.
    """
    ref = layers[0]
    total = None
    bias = None
    for k, (layer, w, b) in enumerate(zip(layers, weights, biases)):
        m = merges.merge(ref.out_space, k)
        w = _as_out_in(w.astype(np.float64), layer.w_out_axis, layer.w_in_axis)
        wk = np.tensordot(m, w, axes=(1, 0)) if layer.group == 1 or layer.per_channel else _blockwise_out(layer, m, w)
        if not layer.per_channel:
            u = merges.unmerge(layer.in_space, k)
            if u is not None:
                wk = _apply_in(layer, wk, u)
        total = wk if total is None else total + wk
        if b is not None:
            bk = m @ b.astype(np.float64).reshape(-1)
            bias = bk if bias is None else bias + bk
    return _from_out_in(total, ref.w_out_axis, ref.w_in_axis), bias


def _conv_blocks(layer: Layer, size: int, axis_name: str):
    """The ``layer.group`` equal blocks of ``size`` channels (slices)."""
    g = layer.group
    if size % g:
        raise InternalError(f"layer {layer.node}: {size} {axis_name} channels in {g} groups")
    n = size // g
    return [slice(i * n, (i + 1) * n) for i in range(g)]


def _check_block_diagonal(layer: Layer, mat: np.ndarray, rows: list, cols: list) -> None:
    rest = mat.copy()
    for r, c in zip(rows, cols):
        rest[r, c] = 0.0
    if np.abs(rest).max(initial=0.0) > 1e-12:
        raise InternalError(f"layer {layer.node}: a merge crosses the blocks of a grouped Conv (group={layer.group})")


def _blockwise_out(layer: Layer, m: np.ndarray, w: np.ndarray) -> np.ndarray:
    """M W for a grouped Conv weight [out, in/group, ...]: merge within each output block."""
    blocks = _conv_blocks(layer, w.shape[0], "output")
    _check_block_diagonal(layer, m, blocks, blocks)
    out = np.zeros((m.shape[0],) + w.shape[1:])
    for b in blocks:
        out[b] = np.tensordot(m[b, b], w[b], axes=(1, 0))
    return out


def _apply_in(layer: Layer, w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """W U on the input axis of an [out, in, ...] weight; per block for a grouped Conv."""
    if layer.group == 1:
        return np.moveaxis(np.tensordot(w, u, axes=(1, 0)), -1, 1)
    outs = _conv_blocks(layer, w.shape[0], "output")
    ins = _conv_blocks(layer, u.shape[0], "input")
    _check_block_diagonal(layer, u, ins, ins)
    out = np.zeros((w.shape[0], u.shape[1] // layer.group) + w.shape[2:])
    for bo, bi in zip(outs, ins):
        out[bo] = np.moveaxis(np.tensordot(w[bo], u[bi, bi], axes=(1, 0)), -1, 1)
    return out


def fold_unmerge(layer: Layer, w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """W U on the layer's input axis: a branch layer reading merged features."""
    if layer.group > 1 and not layer.per_channel:
        moved = _as_out_in(w.astype(np.float64), layer.w_out_axis, layer.w_in_axis)
        return _from_out_in(_apply_in(layer, moved, u), layer.w_out_axis, layer.w_in_axis)
    moved = np.moveaxis(w.astype(np.float64), layer.w_in_axis, -1)
    return np.moveaxis(moved @ u, -1, layer.w_in_axis)


def _tensor_map(graphs: list[LayerGraph], trunk: list[set[str]]) -> list[dict[str, str]]:
    """For each model, its trunk tensors -> the first model's names (structural correspondence)."""
    a = graphs[0]
    maps = [{}]
    a_consumers = a.consumers
    a_consts = {t.name for t in a.model.graph.initializer}
    for g in graphs[1:]:
        mp = {}
        for na, nb in zip(a.inputs, g.inputs):
            mp[nb] = na
        for la, lb in zip(a.layers, g.layers):
            mp.setdefault(lb.input, la.input)
            mp.setdefault(lb.output, la.output)
            mp.setdefault(lb.preact, la.preact)
            for x, y in zip(leaves(la.in_space), leaves(lb.in_space)):
                mp.setdefault(y.tensor, x.tensor)
        consts = {t.name: t for t in g.model.graph.initializer}
        a_init = {t.name: t for t in a.model.graph.initializer}
        for n in g.model.graph.node:
            if all(o in mp for o in n.output if o):
                continue
            ins = [i for i in n.input if i and i not in consts]
            if not ins or not all(i in mp for i in ins):
                continue
            want = [mp[i] for i in ins]
            for cand in a_consumers.get(want[0], []):
                if cand.op_type != n.op_type or len(cand.output) != len(n.output):
                    continue
                cins = [i for i in cand.input if i and i not in a_consts]
                same = cins == want or (n.op_type in ("Add", "Mul", "Sum", "Max", "Min") and sorted(cins) == sorted(want))
                if same and attrs(cand) == attrs(n) and _same_int_consts(n, cand, consts, a_init):
                    for ob, oa in zip(n.output, cand.output):
                        if ob:
                            mp.setdefault(ob, oa)
                    break
        maps.append(mp)
    return maps


def _same_int_consts(n: onnx.NodeProto, cand: onnx.NodeProto, consts: dict, a_consts: dict) -> bool:
    """Integer constant inputs (indices, shapes, axes) must be equal: Gather(shape, 0) is not
    Gather(shape, 1). Float constants are weights and differ between models. Nodes with different
    numbers of inputs (a Concat of two shapes and one of five) never correspond."""
    if len(n.input) != len(cand.input):
        return False
    for x, y in zip(n.input, cand.input):
        tx, ty = consts.get(x), a_consts.get(y)
        if (tx is None) != (ty is None):
            return False
        if tx is not None and tx.data_type in _INT_TYPES:
            if ty.data_type != tx.data_type or not np.array_equal(numpy_helper.to_array(tx), numpy_helper.to_array(ty)):
                return False
    return True


_INT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL)


def build_zipped_model(graphs: list[LayerGraph], merges: Merges, stop_at: int, tasks: list[str]) -> tuple[onnx.ModelProto, ZipLayout]:
    """Assemble the zipped model; ``graphs[k].layers[i]`` correspond across models."""
    builder = _Builder(graphs, merges, stop_at)
    builder.add_trunk()
    maps = _tensor_map(graphs, [set() for _ in graphs])
    any_branch = any(builder.branches)
    outputs: dict[str, list[str]] = {}
    for k in range(len(graphs)):
        branch = _Branch(builder, k, tasks[k], maps[k])
        branch.add_nodes()
        if any_branch:
            outputs[tasks[k]] = branch.outputs()
    if not any_branch:
        outputs = {"*": list(graphs[0].outputs)}
    model = builder.model(_graph_outputs(graphs, tasks, outputs))
    layout = ZipLayout(stop_at, list(tasks), builder.trunk_idx, builder.sites, outputs, builder.n_gather,
                       builder.n_fold, builder.norm_sites)
    return model, layout


class _Builder:
    """The zipped graph under construction: nodes, initializers and correction sites."""

    def __init__(self, graphs: list[LayerGraph], merges: Merges, stop_at: int):
        self.graphs, self.merges = graphs, merges
        a = graphs[0]
        self.trunk_idx = [i for i, l in enumerate(a.layers) if l.number <= stop_at]
        trunk_sets = [{g.layers[i].node for i in self.trunk_idx} for g in graphs]
        self.branches = [branch_nodes(g, trunk_sets[k]) for k, g in enumerate(graphs)]
        self.inits = [{t.name: t for t in g.model.graph.initializer} for g in graphs]
        self._values: list[dict] = [dict() for _ in graphs]
        self.new_inits: dict[str, np.ndarray] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.sites: list[LayerSite] = []
        self.norm_sites: list[NormSite] = []
        self.n_gather = self.n_fold = 0
        self.param_by_site = {(k, p.node, p.input_index): p for k, g in enumerate(graphs) for p in g.params}

    def value(self, k: int, name: str) -> np.ndarray:
        """Initializer ``name`` of model k as an array (converted once)."""
        if name not in self._values[k]:
            self._values[k][name] = numpy_helper.to_array(self.inits[k][name])
        return self._values[k][name]

    def add_trunk(self) -> None:
        """The first model's nodes up to the depth, with merged weights and per-channel parameters."""
        a = self.graphs[0]
        trunk = [_copy(n) for n in a.model.graph.node if n.name not in self.branches[0]]
        used = list(dict.fromkeys(i for n in trunk for i in n.input))  # ordered: byte-identical output
        for name in used:
            if name in self.inits[0]:
                self.new_inits[name] = self.value(0, name)
        for i in self.trunk_idx:
            self._merge_layer(i, trunk)
        self._merge_channel_params({n.name for n in trunk})
        self.nodes.extend(trunk)
        for n in trunk:
            if n.op_type == "BatchNormalization":
                level = next((p.depth for p in a.params if p.node == n.name), 0) + 0.5
                self.norm_sites.append(NormSite(n.name, n.input[0], n.input[3], n.input[4], level))
        for i in self.trunk_idx:
            la = a.layers[i]
            node = next(n for n in self.nodes if n.name == la.node)
            bias = node.input[2] if la.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] else la.bias
            self.sites.append(_site(a, la, i, -1, la.node, la.weight, bias, la.preact, "", self.param_by_site, 0))

    def _merge_layer(self, i: int, trunk: list[onnx.NodeProto]) -> None:
        layers = [g.layers[i] for g in self.graphs]
        ws = [self.value(k, l.weight) for k, l in enumerate(layers)]
        bs = [self.value(k, l.bias) if l.bias else None for k, l in enumerate(layers)]
        w, b = merged_layer(layers, ws, bs, self.merges)
        la = layers[0]
        self.new_inits[la.weight] = w.astype(ws[0].dtype)
        if b is None:
            return
        bias_name = la.bias
        if bias_name is None:  # another model has a bias where model A has none
            bias_name = _fresh(la.weight + "_bias", self.new_inits)
            node = next(n for n in trunk if n.name == la.node)
            if la.op_type not in ("Conv", "Gemm"):
                raise InternalError(f"layer {la.node}: bias on a MatMul without a bias Add")
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bias_name
        self.new_inits[bias_name] = b.astype(ws[0].dtype)

    def _merge_channel_params(self, trunk_names: set[str]) -> None:
        """Per-channel parameters, paired across models by their canonical order: p* = sum_k M_k p_k."""
        for j, pa in enumerate(self.graphs[0].params):
            if pa.node not in trunk_names:
                continue
            total = None
            shape = None
            for k, g in enumerate(self.graphs):
                p = g.params[j]
                v = np.moveaxis(self.value(k, p.initializer).astype(np.float64), p.axis, 0)
                shape = v.shape if shape is None else shape
                if v.shape != shape:
                    v = _fit_param(v, shape, p.node)
                if pa.heads:
                    m = self.merges.head_merge(pa.gid, pa.heads, k)
                elif pa.space is not None:
                    m = self.merges.merge(pa.space, k)
                else:
                    m = self.merges[pa.gid].merge_of(k)
                part = _merge_values(m, v)
                total = part if total is None else total + part
            self.new_inits[pa.initializer] = np.moveaxis(total, 0, pa.axis).astype(self.value(0, pa.initializer).dtype)

    def _inputs(self) -> list:
        """Model A's inputs; with a static batch axis when any source model has one (its nodes,
        in the trunk or in its branch, may have that batch baked into Reshape constants)."""
        inputs = [_copy_vi(i, i.name) for i in self.graphs[0].model.graph.input]
        batch = next((b for g in self.graphs for b in [static_batch_of(g.model)] if b), None)
        if batch is not None:
            for i in inputs:
                dims = i.type.tensor_type.shape.dim
                if len(dims) and not dims[0].dim_value:
                    dims[0].Clear()
                    dims[0].dim_value = batch
        return inputs

    def model(self, graph_outputs: list) -> onnx.ModelProto:
        a = self.graphs[0].model
        graph = helper.make_graph(
            self.nodes, a.graph.name or "zipped", self._inputs(), graph_outputs,
            initializer=[numpy_helper.from_array(np.asarray(v), name) for name, v in self.new_inits.items()],
        )
        model = helper.make_model(graph, opset_imports=list(a.opset_import), ir_version=a.ir_version)
        # nodes and initializers only a branch of another model needed are dropped
        return prune(model)


class _Branch:
    """Model k's nodes after the depth, renamed ``<task>/...``, reading the trunk through its unmerge."""

    def __init__(self, builder: _Builder, k: int, task: str, tensor_map: dict[str, str]):
        self.b, self.k, self.task, self.map = builder, k, task, tensor_map
        self.g = builder.graphs[k]
        self.prefix = f"{task}/"
        self.produced: set[str] = set()
        self.copied_trunk: dict[str, str] = {}
        self.gathers: dict[str, str] = {}
        self.layer_by_node = {l.node: (idx, l) for idx, l in enumerate(self.g.layers)}

    def add_nodes(self) -> None:
        for n in self.g.model.graph.node:
            if n.name in self.b.branches[self.k]:
                self._add_node(n)

    def _add_node(self, n: onnx.NodeProto) -> None:
        c = _copy(n)
        c.name = self.prefix + n.name
        layer = self.layer_by_node.get(n.name)
        for q, inp in enumerate(n.input):
            if inp:
                c.input[q] = self._input(inp, q, n.name, layer)
        for q, o in enumerate(n.output):
            if o:
                c.output[q] = self.prefix + o
                self.produced.add(o)
        self.b.nodes.append(c)
        if layer is not None:
            idx, l = layer
            p = self.prefix
            bias = p + l.bias if l.bias else None
            self.b.sites.append(_site(self.g, l, idx, self.k, p + l.node, p + l.weight, bias, p + l.preact, p,
                                      self.b.param_by_site, self.k))

    def _input(self, inp: str, q: int, consumer: str, layer) -> str:
        """The zipped model's name for input ``q`` (tensor ``inp``) of a branch node."""
        k, b = self.k, self.b
        if inp in b.inits[k]:
            if self.prefix + inp not in b.new_inits:  # a folded unmerge may have written it already
                b.new_inits[self.prefix + inp] = b.value(k, inp)
            return self.prefix + inp
        if inp in self.produced:
            return self.prefix + inp
        if isinstance(self.g.spaces.get(inp, NoFeatures()), (NoFeatures, InputSpace)):
            return self.trunk_tensor(inp, consumer)
        if layer is not None and q == 0 and not layer[1].per_channel:
            l = layer[1]
            u = b.merges.unmerge(l.in_space, k)
            src = self.trunk_tensor(inp, consumer)
            if u is not None:  # a weight layer reads merged features: fold its unmerge into the weight
                b.new_inits[self.prefix + l.weight] = fold_unmerge(l, b.value(k, l.weight), u).astype(b.value(k, l.weight).dtype)
                b.n_fold += 1
            return src
        return self.unmerged(inp, consumer)

    def trunk_tensor(self, name: str, consumer: str) -> str:
        """The zipped model's name for model k's trunk tensor ``name`` (no unmerge)."""
        if self.k == 0:
            return name
        if name in self.map:
            return self.map[name]
        if isinstance(self.g.spaces.get(name, NoFeatures()), (NoFeatures, InputSpace)):
            return self._copy_trunk_node(name)
        raise ArchitectureMismatchError(
            f"cannot route tensor '{name}' of model {self.task} from the trunk into its branch (read by '{consumer}'): "
            "the two graphs differ around it; zip at another depth (--stop-at)"
        )

    def _copy_trunk_node(self, name: str) -> str:
        """Recompute a shape-only trunk tensor of model k inside its branch."""
        if name in self.copied_trunk:
            return self.copied_trunk[name]
        producer = next((n for n in self.g.model.graph.node if name in n.output), None)
        if producer is None:
            raise ArchitectureMismatchError(f"tensor '{name}' of model {self.task} has no producer; re-export the model")
        c = _copy(producer)
        c.name = self.prefix + producer.name
        for q, inp in enumerate(producer.input):
            if not inp:
                continue
            if inp in self.b.inits[self.k]:
                c.input[q] = _add_init(self.b.new_inits, self.prefix + inp, self.b.value(self.k, inp))
            else:
                c.input[q] = self.trunk_tensor(inp, producer.name)
        for q, o in enumerate(producer.output):
            if o:
                c.output[q] = self.prefix + o
                self.copied_trunk[o] = self.prefix + o
        self.b.nodes.append(c)
        return self.copied_trunk[name]

    def unmerged(self, name: str, consumer: str) -> str:
        """Model k's features of trunk tensor ``name``: a Gather through its unmerge."""
        if name in self.gathers:
            return self.gathers[name]
        u = self.b.merges.unmerge(self.g.spaces.get(name), self.k)
        src = self.trunk_tensor(name, consumer)
        if u is None:
            return src
        if not np.allclose(u.sum(axis=1), 1) or not np.isin(u, (0.0, 1.0)).all():
            raise InternalError("an explicit unmerge needs a 0/1 match")
        idx = u.argmax(axis=1).astype(np.int64)
        if np.array_equal(idx, np.arange(len(idx))) and u.shape[0] == u.shape[1]:
            self.gathers[name] = src
            return src
        p = self.prefix
        idx_name = _add_init(self.b.new_inits, f"{p}unmerge/{name}/indices", idx)
        out = f"{p}unmerge/{name}"
        self.b.nodes.append(helper.make_node("Gather", [src, idx_name], [out], name=f"{p}unmerge/{name}",
                                             axis=int(self.g.channel_axis(name))))
        self.b.n_gather += 1
        self.gathers[name] = out
        return out

    def outputs(self) -> list[str]:
        """The branch's outputs ``<task>/<name>`` (an Identity where the trunk computes one)."""
        outs = []
        for o in self.g.outputs:
            if o in self.produced:
                outs.append(self.prefix + o)
                continue
            alias = self.prefix + o
            self.b.nodes.append(helper.make_node("Identity", [self.unmerged(o, "graph output")], [alias],
                                                 name=f"{self.prefix}output/{o}"))
            outs.append(alias)
        return outs


def _graph_outputs(graphs: list[LayerGraph], tasks: list[str], outputs: dict[str, list[str]]) -> list:
    a = graphs[0]
    if "*" in outputs:
        a_out = {o.name: o for o in a.model.graph.output}
        return [_copy_vi(a_out[o], o) for o in a.outputs]
    found = []
    for k, g in enumerate(graphs):
        g_out = {o.name: o for o in g.model.graph.output}
        found += [_copy_vi(g_out[o], new) for o, new in zip(g.outputs, outputs[tasks[k]])]
    return found


def _site(g: LayerGraph, l: Layer, idx: int, k: int, node: str, weight: str, bias: str | None, preact: str,
          prefix: str, param_by_site: dict, model: int) -> LayerSite:
    chain = []
    for node_name, q, init, sign in l.bias_chain:
        p = param_by_site.get((model, node_name, q))
        name = init if k == -1 else prefix + init
        chain.append((prefix + node_name if k != -1 else node_name, name, p.axis if p else 0, sign))
    axis = g.channel_axis(l.preact)
    space = g.spaces.get(l.preact)
    if axis is None or (isinstance(space, GroupSpace) and isinstance(l.out_space, GroupSpace) and space.gid != l.out_space.gid):
        # a token-mixing layer's output carries the channel group: its own features are on its out axis
        axis = l.out_space.axis if isinstance(l.out_space, GroupSpace) else 1
    return LayerSite(idx, k, node, weight, bias, l.w_out_axis, preact, axis, chain, l.number, g.sample_layout(l.preact))


def _fit_param(v: np.ndarray, shape: tuple, node: str) -> np.ndarray:
    """Another model's per-channel parameter (channels on axis 0) in the first model's shape: the
    same values spelled with other unit axes, or a value repeated along the batch (a class token
    that the dynamo exporter expanded to its static batch, [8, 1, D], where the TorchScript
    exporter keeps [1, 1, D] and expands at run time) on one side and broadcast on the other."""
    if v.size == int(np.prod(shape)):
        return v.reshape(shape)
    if v.ndim != len(shape) or v.shape[0] != shape[0]:
        raise ArchitectureMismatchError(f"per-channel parameter of '{node}': shape {list(v.shape)} cannot take the "
                                        f"first model's {list(shape)} (channels first)")
    for axis, (have, want) in enumerate(zip(v.shape, shape)):
        if have == want:
            continue
        if want == 1 and np.array_equal(v, np.broadcast_to(v.take([0], axis=axis), v.shape)):
            v = v.take([0], axis=axis)
        elif have == 1:
            v = np.repeat(v, want, axis=axis)
        else:
            raise ArchitectureMismatchError(
                f"per-channel parameter of '{node}': shape {list(v.shape)} vs the first model's {list(shape)} "
                f"(channels first) along axis {axis}, with values that differ along it; zip models from the same exporter"
            )
    return v


def _merge_values(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m @ v`` along v's first axis, where infinite entries (an attention mask's -inf) stay infinite
    wherever a member with weight holds them (0 * inf would be NaN)."""
    finite = np.isfinite(v)
    if finite.all():
        return np.tensordot(m, v, axes=(1, 0))
    out = np.tensordot(m, np.where(finite, v, 0.0), axes=(1, 0))
    used = (m != 0).astype(np.float64)
    for sign in (1.0, -1.0):
        hit = np.tensordot(used, (~finite & (np.sign(v) == sign)).astype(np.float64), axes=(1, 0)) > 0
        out[hit] = sign * np.inf
    return out


def _copy(n: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(n)
    return c


def _copy_vi(vi: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    c = onnx.ValueInfoProto()
    c.CopyFrom(vi)
    c.name = name
    return c


def _fresh(name: str, taken) -> str:
    while name in taken:
        name += "_"
    return name


def _add_init(inits: dict, name: str, value: np.ndarray) -> str:
    inits[name] = value
    return name
