"""build_layer_graph(): parse a normalized model into a :class:`LayerGraph`.

Walks the nodes in topological order; each op's handler (``onnxzip.ops``) says how the feature
space of its inputs reaches its outputs. Shapes come from one onnxruntime probe run on an
example batch (exact, whatever the exporter wrote in value_info).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxzip.errors import ModelLoadError, UnsupportedOpError
from onnxzip.graph.samples import sample_layouts
from onnxzip.graph.layergraph import ChannelParam, FeatureGroup, Layer, LayerGraph, Unsupported
from onnxzip.graph.spaces import (
    Blocked, ConcatSpace, ExpandSpace, GroupSpace, HeadPart, HeadsOnly, HeadSpace, InputSpace, NoFeatures, RepeatSpace,
    SelectSpace, Space, StackSpace, channel_sources, leaves,
)
from onnxzip.ops import get_handler
from onnxzip.ops.attention import carry_head_axis
from onnxzip.onnx_nodes import attr, consumers
from onnxzip.runtime import session

__all__ = ["build_layer_graph", "probe_shapes", "example_inputs", "static_batch_of", "BuildContext"]

MOVED_SAMPLES = "::onnxzip_moved_samples"  # probe_shapes' note in ``values``

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


def declared_inputs(model: onnx.ModelProto) -> list[tuple[str, list, type]]:
    """(name, dims with None for symbolic ones, numpy dtype) of each graph input."""
    specs = []
    for i in model.graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append((i.name, dims, _ONNX_TO_NP.get(t.elem_type, np.float32)))
    return specs


def static_batch_of(model: onnx.ModelProto) -> int | None:
    """The batch size fixed by the model's inputs (their axis 0), None when the batch axis is dynamic."""
    return next((dims[0] for _, dims, _ in declared_inputs(model) if dims and dims[0]), None)


def example_inputs(model: onnx.ModelProto, batch: int = 1) -> dict[str, np.ndarray]:
    """Zeros shaped like the inputs; symbolic dimensions become ``batch`` on axis 0, else 1."""
    feeds = {}
    for name, dims, dtype in declared_inputs(model):
        shape = [d if d else (batch if k == 0 else 1) for k, d in enumerate(dims)]
        feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def probe_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], values: dict | None = None) -> dict[str, tuple]:
    """Run the model once with every node output fetched; return every tensor's shape.

    ``values``, if given, receives the small integer tensors (shape computations: Slice bounds,
    Reshape targets) as the run computed them.
    """

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in existing:
                m.graph.output.append(helper.make_empty_tensor_value_info(o))
                existing.add(o)
    sess = session(m, optimization="disable")
    try:
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, feeds)
    except Exception as e:
        raise ModelLoadError(
            f"onnxruntime cannot run the model on an example batch ({str(e).splitlines()[0][:300]}); "
            "check that it runs in onnxruntime, or pass calibration data with the real input shapes"
            + ("; token ids must be smaller than the embedding table's rows (the vocabulary)"
               if "out of data bounds" in str(e) else "")
        ) from e
    shapes = {n: tuple(np.shape(v)) for n, v in zip(names, outs)}
    if values is not None:
        values.update({n: v for n, v in zip(names, outs)
                       if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.integer) and v.size <= 64})
        # float tensors whose first axis is not the batch of one: the samples may lie elsewhere
        values[MOVED_SAMPLES] = any(isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating) and v.ndim
                                    and v.shape[0] != 1 for v in outs)
    for k, v in feeds.items():
        shapes[k] = tuple(v.shape)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


class BuildContext:
    """What op handlers see: spaces, constants, shapes, and the records being built."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple]):
        self.model = model
        self.consts = {t.name: t for t in model.graph.initializer}
        self.probed: dict[str, np.ndarray] = {}  # small integer tensors of the probe run (shape computations)
        self._const_values: dict[str, np.ndarray] = {}
        self.shapes = shapes
        self.spaces: dict[str, Space] = {}
        self.parent: dict[int, int] = {}
        self.group_size: dict[int, int] = {}
        self.crossed: dict[int, list] = {}
        self.layers: list[Layer] = []
        self.params: list[ChannelParam] = []
        self.unsupported: list[Unsupported] = []
        self.topo = 0
        self.axis_of: dict[str, int] = {}
        self.head_axis_of: dict[str, int] = {}  # attention tensors: where the head axis is
        self.head_fold_of: dict[str, int] = {}  # ... and the outer factor folded into it (1 if absent)
        self.stack_axis_of: dict[str, int] = {}  # StackSpace tensors: where the part axis is
        self.carried: dict[str, GroupSpace] = {}  # token-mixing MLP tensors: the channel group they carry
        self.aligned: set[int] = set()  # groups of token positions: the same in every model
        self.token_bias: set = set()  # (Add node, bias) pairs that a token-mixing layer owns
        self.group_heads: dict[int, int] = {}
        self.repeats: dict[int, tuple[int, int]] = {}  # grouped-query attention: q's group -> (k's group, repeats)
        self.tie_parent: dict[int, int] = {}
        self.rotary: set[int] = set()  # groups whose within-head channel order is fixed (see fix_within_heads)
        self.rotary_cuts: dict[int, set] = {}  # gid -> the channel ranges of whole heads its rotary cuts kept
        self.pieces: dict[int, list[frozenset]] = {}  # gid -> channel sets every merge must keep apart
        self.consumers: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        self.graph_outputs = {o.name for o in model.graph.output}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        for name, _, _ in declared_inputs(model):
            self.spaces[name] = InputSpace()

    # ---- lookups
    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, name: str) -> np.ndarray:
        if name not in self._const_values:
            self._const_values[name] = numpy_helper.to_array(self.consts[name])
        return self._const_values[name]

    def int_value(self, name: str) -> np.ndarray | None:
        """An integer initializer, or a small integer tensor computed from shapes, as the probe saw
        it (a Slice bound computed from a shape); None for anything else."""
        if self.is_const(name):
            return self.const(name)
        if isinstance(self.space(name), NoFeatures) and name in self.probed:
            return self.probed[name]
        return None

    def space(self, name: str) -> Space:
        if not name or name in self.consts:
            return NoFeatures()
        return self.spaces.get(name, NoFeatures())

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    attr = staticmethod(attr)  # handlers read attributes through the context

    # ---- groups
    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def new_group(self, size: int, tensor: str, axis: int) -> GroupSpace:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.group_size[gid] = size
        return GroupSpace(gid, size, tensor, axis)

    def union(self, spaces: list[GroupSpace], tensor: str, axis: int) -> GroupSpace:
        root = self.find(spaces[0].gid)
        for s in spaces[1:]:
            other = self.find(s.gid)
            if other != root:
                heads = {self.group_heads.get(root), self.group_heads.get(other)} - {None}
                ties = [self.tie_find(root), self.tie_find(other)]
                self.parent[max(root, other)] = min(root, other)
                root = min(root, other)
                if heads:
                    self.group_heads[root] = max(heads)
                self.tie_parent.setdefault(root, root)
                self.tie_heads(*ties)
        return GroupSpace(root, spaces[0].size, tensor, axis)

    def feature_axis(self, name: str) -> int | None:
        """The channel axis of a feature tensor."""
        space = self.space(name)
        if isinstance(space, GroupSpace):
            return space.axis
        return self.axis_of.get(name)

    def set_axis(self, name: str, axis: int) -> None:
        self.axis_of[name] = axis

    @staticmethod
    def is_feature(space: Space) -> bool:
        return isinstance(space, (GroupSpace, ConcatSpace, ExpandSpace, HeadSpace, HeadsOnly, HeadPart, StackSpace,
                                  SelectSpace, RepeatSpace))

    def keep_apart(self, space: Space, positions) -> bool:
        """Channels ``positions`` of ``space`` form a piece of their groups that merges keep whole
        (a grouped Conv's block, one side of a channel split): no feature inside the piece is ever
        merged with one outside it. False when the space's channels are not group channels."""
        sources = channel_sources(space)
        if sources is None:
            return False
        by_gid: dict[int, set] = {}
        for p in positions:
            gid, c = sources[p]
            by_gid.setdefault(gid, set()).add(c)
        for gid, chans in by_gid.items():
            if len(chans) < self.group_size[gid]:
                self.pieces.setdefault(gid, []).append(frozenset(chans))
        return True

    def select(self, space: Space, index, tensor: str, axis: int) -> Space | None:
        """Channels ``index`` of ``space`` (a channel Split, Slice or permutation) at ``tensor``;
        None when the space cannot be cut (flattened maps, attention heads)."""
        index = tuple(int(i) for i in index)
        if channel_sources(space) is None:
            return None
        if index == tuple(range(space.size)):
            out = self.follow(space, tensor, axis)
            if not isinstance(out, GroupSpace):
                self.set_axis(tensor, axis)
            return out
        if len(set(index)) != len(index):
            return None  # a channel read twice: not a selection
        self.keep_apart(space, index)
        self.set_axis(tensor, axis)
        return SelectSpace(space, index, len(index))

    def set_heads(self, gid: int, heads: int) -> bool:
        """Mark a group as ``heads`` heads; False if it was already split another way."""
        root = self.find(gid)
        if self.group_heads.get(root, heads) != heads:
            return False
        self.group_heads[root] = heads
        return True

    def fix_within_heads(self, gid: int) -> None:
        """A constant varies along the within-head axis (rotary cos/sin tables): the merge may pair
        and merge whole heads, but channel i of a head only meets channel i of another head."""
        self.rotary.add(gid)

    def note_rotary_cut(self, gid: int, kept: tuple | None) -> None:
        """A cut of a rotary group's heads kept channels ``kept`` (a range of a whole head; None
        for anything else). When every cut keeps one half, [0, d/2) or [d/2, d) (rotate_half),
        channel i turns with channel i + d/2 by the same angle, and a merge may turn each such pair
        (``FeatureGroup.rotary_pairs``)."""
        self.rotary_cuts.setdefault(gid, set()).add(kept)

    def tie_find(self, gid: int) -> int:
        gid = self.find(gid)
        self.tie_parent.setdefault(gid, gid)
        while self.tie_parent[gid] != gid:
            gid = self.tie_parent[gid]
            self.tie_parent.setdefault(gid, gid)
        return gid

    def repeat_heads(self, q: int, k: int, repeats: int) -> bool:
        """Grouped-query attention: every head of k's group meets ``repeats`` heads of q's group in
        a row, so q's merge is k's merge on every repeat (:class:`RepeatSpace`). False if q's group
        already repeats another group, or is k's."""
        q, k = self.find(q), self.find(k)
        if q == k or self.repeats.get(q, (k, repeats)) != (k, repeats):
            return False
        self.repeats[q] = (k, repeats)
        return True

    def tie_heads(self, a: int, b: int) -> None:
        """Groups a and b share one assignment of heads (q/k and v of one attention)."""
        ra, rb = self.tie_find(a), self.tie_find(b)
        if ra != rb:
            self.tie_parent[max(ra, rb)] = min(ra, rb)

    def follow(self, space: Space, tensor: str, axis: int | None = None) -> Space:
        """The space of an element-wise op's output: the same features, now at ``tensor``."""
        if isinstance(space, GroupSpace):
            return GroupSpace(space.gid, space.size, tensor, space.axis if axis is None else axis)
        return space

    # ---- records
    def attach_bias(self, node: onnx.NodeProto, index: int, tensor: str, axis: int) -> bool:
        """MatMul + Add(bias): make the Add's constant the MatMul layer's bias."""
        layer = next((l for l in reversed(self.layers) if l.output == tensor), None)
        if layer is None or layer.op_type != "MatMul" or layer.bias is not None:
            return False
        if self.consumers.get(tensor, 0) != 1 or tensor in self.graph_outputs or len(node.input) != 2:
            return False
        shape = self.shape(node.input[index])
        if int(np.prod(shape)) != shape[axis]:
            return False
        layer.bias = node.input[index]
        layer.output = node.output[0]
        return True

    def add_layer(self, layer: Layer) -> None:
        layer.topo = self.topo
        self.layers.append(layer)

    def add_param(self, node: onnx.NodeProto, index: int, axis: int, space: Space) -> None:
        """A per-channel parameter of ``space``; over a composite space (LayerNorm or BatchNorm after a
        Concat) its channels are merged part by part (``ChannelParam.space``)."""
        if isinstance(space, HeadsOnly):  # one value per head
            self.params.append(ChannelParam(node.name, node.op_type, index, node.input[index], axis, space.gid,
                                            topo=self.topo, heads=space.heads))
            return
        composite = None if isinstance(space, GroupSpace) else space
        for leaf in leaves(space):
            self.params.append(ChannelParam(node.name, node.op_type, index, node.input[index], axis, leaf.gid,
                                            topo=self.topo, space=composite))
            return

    def cross_channel(self, node: onnx.NodeProto, space: Space) -> None:
        """``node`` mixes the channels of ``space``: fine for an output group, else a limit."""
        gids = _space_gids(space)
        for gid in gids:
            self.crossed.setdefault(gid, []).append((node.name, node.op_type))

    def block(self, node: onnx.NodeProto, space: Space) -> None:
        """``node`` takes ``space``'s features where the zip cannot follow them: a trunk that made
        them would hand a blocked tensor to the branches, so each group they belong to (attention
        heads included) limits the depth."""
        gids = _space_gids(space)
        for gid in gids:
            self.crossed.setdefault(gid, []).append((node.name, node.op_type))

    def unsupported_op(self, node: onnx.NodeProto, reason: str) -> list[Space]:
        """Record that the zip cannot pass through ``node``; its outputs are blocked."""
        spaces = [self.space(i) for i in node.input if i]
        feats = [s for s in spaces if self.is_feature(s)]
        if not feats and not any(isinstance(s, Blocked) for s in spaces):
            # only model inputs or shapes flow in: the op computes the same thing in both models
            kind = InputSpace() if any(isinstance(s, InputSpace) for s in spaces) else NoFeatures()
            return [kind for _ in node.output]
        for s in feats:
            self.block(node, s)
        self.unsupported.append(Unsupported(node.name, node.op_type, reason))
        return [Blocked(node.name, node.op_type) for _ in node.output]

    def join_blocked(self, node: onnx.NodeProto, outs: list[Space]) -> None:
        """A handler passed a blocked input on (an Add, a MatMul of attention weights and values, ...):
        the features that joined it are blocked as well."""
        blocked = next((s for s in outs if isinstance(s, Blocked)), None)
        if blocked is None or blocked.node == node.name:
            return
        feats = [s for s in (self.space(i) for i in node.input if i) if self.is_feature(s)]
        for s in feats:
            self.block(node, s)
        if feats and not any(u.node == node.name for u in self.unsupported):
            self.unsupported.append(Unsupported(
                node.name, node.op_type, f"joins features with the output of '{blocked.node}' ({blocked.op_type}), "
                                         "which the zip cannot pass through"))


def _name_nodes(model: onnx.ModelProto) -> None:
    used = set()
    for k, n in enumerate(model.graph.node):
        if not n.name or n.name in used:
            base = n.name or f"{n.op_type}_{k}"
            name = base
            while name in used:
                name = f"{base}_{k}"
            n.name = name
        used.add(n.name)


def build_layer_graph(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
                      notes: list[str] = ()) -> LayerGraph:
    """Parse a normalized model (see :func:`onnxzip.normalize.normalize`).

    Args:
        model: the normalized model; nodes without names get unique ones (in place).
        feeds: an example batch used to learn every tensor's shape (zeros if omitted).
        notes: what normalization changed (kept on the graph for ``check``).
    """
    _name_nodes(model)
    feeds = feeds if feeds is not None else example_inputs(model)
    small: dict[str, np.ndarray] = {}
    shapes = probe_shapes(model, feeds, small)
    ctx = BuildContext(model, shapes)
    ctx.probed = small
    for k, node in enumerate(model.graph.node):
        ctx.topo = k
        handler = get_handler(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None:
            outs = ctx.unsupported_op(node, f"onnxzip has no handler for op type {node.domain + '.' if node.domain else ''}{node.op_type}")
        else:
            outs = handler(ctx, node)
        ctx.join_blocked(node, outs)
        _carry_channels(ctx, node, outs)
        for name, space in zip(node.output, outs):
            if name:
                ctx.spaces[name] = space
                if isinstance(space, (HeadSpace, HeadsOnly, HeadPart, RepeatSpace, ConcatSpace)) and name not in ctx.head_axis_of:
                    _carry_head_axis(ctx, node, name, space)
    graph = _finish(ctx)
    graph.notes = list(notes)
    graph.samples = _sample_layouts(ctx, feeds)
    preacts = {l.preact for l in graph.layers}
    for g in graph.groups.values():
        for t, _ in g.tensors:
            if t in ctx.carried and t not in preacts:  # a token MLP's hidden units: pooled over the channels
                graph.pooled[t] = ctx.carried[t].axis
    return graph


def _sample_layouts(ctx: BuildContext, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Where each tensor holds its samples (:mod:`onnxzip.graph.samples`), from a probe on two
    samples when the batch axis is dynamic (one sample cannot tell the batch axis from others)."""
    specs = declared_inputs(ctx.model)
    batch = max((np.shape(v)[0] for v in feeds.values() if np.ndim(v)), default=1)
    shapes = ctx.shapes
    if batch == 1 and not ctx.probed.get(MOVED_SAMPLES, True):
        return {}  # every activation of one sample has 1 on axis 0: the samples stay there
    if batch == 1 and specs and all(dims and not dims[0] for _, dims, _ in specs):
        try:
            shapes = probe_shapes(ctx.model, {k: np.concatenate([v, v]) for k, v in feeds.items()})
            batch = 2
        except ModelLoadError:
            pass
    return sample_layouts(ctx.model, shapes, batch)


def _carry_channels(ctx: BuildContext, node, outs: list) -> None:
    """Inside a token-mixing MLP, element-wise ops and biases keep the channel group it carries."""
    src = node.input[0] if node.input else ""
    carried = ctx.carried.get(src) or (ctx.carried.get(node.input[1]) if len(node.input) > 1 else None)
    if carried is None or not outs or node.output[0] in ctx.carried:
        return
    feeding = next(i for i in node.input if i in ctx.carried)
    same = ctx.space(feeding)
    if isinstance(outs[0], GroupSpace) and isinstance(same, GroupSpace) and ctx.find(outs[0].gid) == ctx.find(same.gid):
        ctx.carried[node.output[0]] = GroupSpace(carried.gid, carried.size, node.output[0], carried.axis)


def _space_gids(space: Space) -> list[int]:
    """The groups whose features a tensor of ``space`` holds (attention tensors included)."""
    if isinstance(space, RepeatSpace):
        return _space_gids(space.part)
    if isinstance(space, (HeadSpace, HeadsOnly, HeadPart)):
        return [space.gid]
    return [leaf.gid for leaf in leaves(space)]


def _carry_head_axis(ctx: BuildContext, node, name: str, space: Space) -> None:
    """An element-wise op keeps the head axis of its input (right-aligned broadcasting)."""
    for i in node.input:
        if i in ctx.head_axis_of and ctx.space(i) == space:
            carry_head_axis(ctx, i, name, ctx.head_axis_of[i] + (ctx.rank(name) or 0) - (ctx.rank(i) or 0))
            if isinstance(space, HeadsOnly):
                ctx.set_axis(name, ctx.head_axis_of[name])
            return


def _resolve(ctx: BuildContext, space: Space) -> Space:
    if isinstance(space, GroupSpace):
        return GroupSpace(ctx.find(space.gid), space.size, space.tensor, space.axis)
    if isinstance(space, ConcatSpace):
        return ConcatSpace(tuple(_resolve(ctx, p) for p in space.parts), space.size)
    if isinstance(space, ExpandSpace):
        return ExpandSpace(_resolve(ctx, space.part), space.outer, space.inner, space.size)
    if isinstance(space, SelectSpace):
        return SelectSpace(_resolve(ctx, space.part), space.index, space.size)
    if isinstance(space, RepeatSpace):
        return RepeatSpace(_resolve(ctx, space.part), space.heads, space.repeats, space.size)
    if isinstance(space, HeadSpace):
        return HeadSpace(ctx.find(space.gid), space.size, space.heads)
    if isinstance(space, HeadsOnly):
        return HeadsOnly(ctx.find(space.gid), space.heads)
    if isinstance(space, HeadPart):
        return HeadPart(ctx.find(space.gid), space.size, space.heads, space.width)
    if isinstance(space, StackSpace):
        return StackSpace(tuple(_resolve(ctx, p) for p in space.parts), space.size, space.heads)
    return space


def _finish(ctx: BuildContext) -> LayerGraph:
    """The layer graph from a finished walk: layers numbered as in the paper, groups renumbered
    canonically (by the first layer producing them) with their measure points, output groups,
    attention heads and the depth each unsupported op allows."""
    model = ctx.model
    for layer in ctx.layers:
        layer.in_space = _resolve(ctx, layer.in_space)
        layer.out_space = _resolve(ctx, layer.out_space)
    for p in ctx.params:
        p.gid = ctx.find(p.gid)
        if p.space is not None:
            p.space = _resolve(ctx, p.space)
    _number_layers(model, ctx.layers)
    _bias_chains(model, ctx)
    order = sorted(ctx.layers, key=lambda l: (l.number, l.depth, l.topo))
    remap = _canonical_group_ids(ctx, order)
    spaces = {k: _renumber(_resolve(ctx, v), remap) for k, v in ctx.spaces.items()}
    for layer in order:
        layer.in_space, layer.out_space = _renumber(layer.in_space, remap), _renumber(layer.out_space, remap)
    for p in ctx.params:
        p.gid = remap[p.gid]
        if p.space is not None:
            p.space = _renumber(p.space, remap)
    groups = _groups(ctx, order, remap, spaces, [o.name for o in model.graph.output])
    num_layers = max((l.number for l in order), default=0)
    unsupported = _depth_limits(ctx, groups, order, num_layers)
    # params: canonical order inside each group
    depth_of_tensor = _tensor_depths(model, order)
    node_by_name = {n.name: n for n in model.graph.node}
    for p in ctx.params:
        p.depth = depth_of_tensor.get(node_by_name[p.node].input[0], 0)
    params = sorted(ctx.params, key=lambda p: (p.gid, p.depth, p.topo, p.input_index))
    return LayerGraph(
        model=model, layers=order, groups=dict(sorted(groups.items())), params=params,
        spaces=spaces, shapes=ctx.shapes, unsupported=unsupported,
        inputs=[i.name for i in model.graph.input], outputs=[o.name for o in model.graph.output],
        num_layers=num_layers, axes=dict(ctx.axis_of),
    )


def _canonical_group_ids(ctx: BuildContext, order: list[Layer]) -> dict[int, int]:
    """Group roots -> 0, 1, ... in the order of the first layer producing them (then the rest)."""
    remap: dict[int, int] = {}
    for layer in order:
        for leaf in leaves(layer.out_space):
            remap.setdefault(leaf.gid, len(remap))
    for gid in list(ctx.group_size):
        remap.setdefault(ctx.find(gid), len(remap))
    return remap


def _renumber(space: Space, remap: dict[int, int]) -> Space:
    if isinstance(space, GroupSpace):
        return GroupSpace(remap[space.gid], space.size, space.tensor, space.axis)
    if isinstance(space, ConcatSpace):
        return ConcatSpace(tuple(_renumber(p, remap) for p in space.parts), space.size)
    if isinstance(space, ExpandSpace):
        return ExpandSpace(_renumber(space.part, remap), space.outer, space.inner, space.size)
    if isinstance(space, SelectSpace):
        return SelectSpace(_renumber(space.part, remap), space.index, space.size)
    if isinstance(space, RepeatSpace):
        return RepeatSpace(_renumber(space.part, remap), space.heads, space.repeats, space.size)
    if isinstance(space, HeadSpace):
        return HeadSpace(remap[space.gid], space.size, space.heads)
    if isinstance(space, HeadsOnly):
        return HeadsOnly(remap[space.gid], space.heads)
    if isinstance(space, HeadPart):
        return HeadPart(remap[space.gid], space.size, space.heads, space.width)
    if isinstance(space, StackSpace):
        return StackSpace(tuple(_renumber(p, remap) for p in space.parts), space.size, space.heads)
    return space


def _groups(ctx: BuildContext, order: list[Layer], remap: dict[int, int], spaces: dict, outputs: list[str]) -> dict:
    """The feature groups (renumbered): producers, ops crossing them, output flag, where each is
    measured, attention heads."""
    groups: dict[int, FeatureGroup] = {}
    for idx, layer in enumerate(order):
        for leaf in leaves(layer.out_space):
            groups.setdefault(leaf.gid, FeatureGroup(leaf.gid, leaf.size)).producers.append(idx)
    for old_root, crossers in ctx.crossed.items():
        gid = remap[ctx.find(old_root)]
        if gid in groups:
            groups[gid].blocked_by.extend(crossers)
    for o in outputs:
        for leaf in leaves(spaces.get(o, NoFeatures())):
            if leaf.gid in groups:
                groups[leaf.gid].output = True
    seen = set()
    for layer in order:
        # a repeat of grouped-query attention's values holds other values than the group's own
        # tensor: the group is measured where it is made
        for leaf in ([] if isinstance(layer.in_space, RepeatSpace) else leaves(layer.in_space)):
            if leaf.tensor not in seen and leaf.gid in groups:
                seen.add(leaf.tensor)
                groups[leaf.gid].tensors.append((leaf.tensor, leaf.axis))
    for g in groups.values():
        if not g.tensors and not g.output:  # no weight layer reads it (attention's q and k): measure where it is made
            for i in g.producers:
                space = spaces.get(order[i].output)
                if isinstance(space, GroupSpace) and space.gid == g.gid:
                    g.tensors.append((order[i].output, space.axis))
    for old in ctx.rotary:
        gid = remap.get(ctx.find(old))
        if gid in groups:
            groups[gid].rotary = True
    for old_root in ctx.aligned:
        gid = remap.get(ctx.find(old_root))
        if gid in groups:
            groups[gid].aligned = True
            groups[gid].tensors = []  # averaged, never matched: nothing to measure
    for old_root, heads in ctx.group_heads.items():
        gid = remap.get(ctx.find(old_root))
        if gid in groups:
            groups[gid].attention_heads = heads
            groups[gid].attention_tie = remap.get(ctx.find(ctx.tie_find(old_root)), gid)
    cuts: dict[int, set] = {}
    for old, kept in ctx.rotary_cuts.items():
        cuts.setdefault(remap.get(ctx.find(old)), set()).update(kept)
    for gid, kept in cuts.items():
        if gid in groups and groups[gid].attention_heads > 1:
            d = groups[gid].size // groups[gid].attention_heads
            groups[gid].rotary_pairs = kept == {(0, d // 2), (d // 2, d)} and d % 2 == 0
    for old_q, (old_k, repeats) in ctx.repeats.items():
        q, k = remap.get(ctx.find(old_q)), remap.get(ctx.find(old_k))
        if q in groups and k in groups:
            groups[q].repeat_of = (k, repeats)
    pieces: dict[int, list] = {}
    for old, cut in ctx.pieces.items():
        pieces.setdefault(remap.get(ctx.find(old)), []).extend(cut)
    for gid, cut in pieces.items():
        if gid in groups:
            groups[gid].blocks = partition(groups[gid].size, cut)
    num_layers = max((l.number for l in order), default=0)
    for g in groups.values():
        # made only by final layers (no weight layer downstream: numbered m): the models' outputs
        # share this space whatever ops follow (an L2 normalisation, a scale, a softmax)
        if g.producers and all(order[i].number == num_layers for i in g.producers):
            g.output = True
            g.tensors = []
    return groups


def partition(size: int, pieces) -> tuple:
    """The coarsest partition of ``range(size)`` that keeps each piece (a set of channels) apart
    from the rest: channels end up in one block when every piece holds both or neither. Blocks
    in order of their first channel; ``()`` when that is one block."""
    label = [0] * size
    for piece in pieces:
        seen: dict = {}
        label = [seen.setdefault((label[c], c in piece), len(seen)) for c in range(size)]
    blocks: dict[int, list] = {}
    for c, l in enumerate(label):
        blocks.setdefault(l, []).append(c)
    return tuple(tuple(b) for b in blocks.values()) if len(blocks) > 1 else ()


def _depth_limits(ctx: BuildContext, groups: dict, order: list[Layer], num_layers: int) -> list[Unsupported]:
    """Every unsupported op with the deepest zip it allows: an op crossing the channels of a
    group (not an output group) stops the zip before the group's first producer."""
    unsupported = list(ctx.unsupported)
    for u in unsupported:
        u.max_depth = num_layers
    for g in groups.values():
        if g.blocked_by and not g.output:
            limit = min(order[i].number for i in g.producers) - 1
            for node, op in g.blocked_by:
                hit = next((u for u in unsupported if u.node == node), None)
                if hit is None:
                    hit = Unsupported(node, op, f"{op} mixes the channels of a feature group", num_layers)
                    unsupported.append(hit)
                hit.max_depth = min(hit.max_depth, limit)
    return unsupported


def _tensor_depths(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, int]:
    """Longest path of weight layers from the inputs to each tensor."""
    by_node = {l.node: l for l in layers}
    depth: dict[str, int] = {}
    for n in model.graph.node:
        d = max((depth.get(i, 0) for i in n.input if i), default=0)
        if n.name in by_node:
            d += 1
        for o in n.output:
            depth[o] = d
    return depth


def _number_layers(model: onnx.ModelProto, layers: list[Layer]) -> None:
    """The paper's numbering: m minus the longest path of weight layers to an output, plus one.

    Main-path layers get 1..m in order; a shortcut layer gets the number of the last layer of
    the block it bypasses (it joins the main path where that block ends).
    """
    by_node = {l.node: l for l in layers}
    depth = _tensor_depths(model, layers)
    height: dict[str, int] = {}
    for n in reversed(model.graph.node):
        h = max((height.get(o, 0) for o in n.output if o), default=0)
        if n.name in by_node:
            h += 1
            by_node[n.name].depth = depth[n.output[0]]
            by_node[n.name].number = h  # temporarily the height
        for i in n.input:
            if i:
                height[i] = max(height.get(i, 0), h)
    m = max((l.number for l in layers), default=0)
    for l in layers:
        l.number = m - l.number + 1


def _bias_chains(model: onnx.ModelProto, ctx: BuildContext) -> None:
    """Per layer, the per-channel bias Adds that follow it alone (MatMul + Add is one dense layer)."""
    readers = consumers(model)
    outputs = {o.name for o in model.graph.output}
    params = {(p.node, p.input_index) for p in ctx.params}
    for layer in ctx.layers:
        t = layer.output
        while t not in outputs and len(readers.get(t, [])) == 1:
            n = readers[t][0]
            if n.op_type not in ("Add", "Sub") or len(n.input) != 2:
                break
            k = 1 if n.input[0] == t else 0
            if (n.name, k) not in params:
                break
            sign = -1.0 if (n.op_type == "Sub" and k == 1) else 1.0
            if n.op_type == "Sub" and k == 0:
                break  # const - x flips the sign of the features
            layer.bias_chain.append((n.name, k, n.input[k], sign))
            t = n.output[0]
        layer.preact = t


def require_depth(graph: LayerGraph, stop_at: int, label: str = "model") -> None:
    """Raise if an unsupported op lies before ``stop_at``."""
    for u in graph.unsupported:
        if stop_at > u.max_depth:
            raise UnsupportedOpError(
                f"{label}: cannot zip through node '{u.node}' ({u.op_type}): {u.reason}; "
                f"zip at most {u.max_depth} layers (--stop-at {u.max_depth}) or re-export without it"
            )
