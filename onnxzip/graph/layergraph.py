"""The layer graph: weight layers, feature groups and per-channel parameters of one model."""

from __future__ import annotations

import functools

from dataclasses import dataclass, field

import onnx

from onnxzip.graph.spaces import GroupSpace, Space

__all__ = ["Layer", "ChannelParam", "FeatureGroup", "Unsupported", "LayerGraph"]


@dataclass
class Layer:
    """A node with trainable weights: Conv, Gemm or MatMul with an initializer, or a Gather from an
    initializer table (an embedding: [rows, D], output channels on axis 1, no input channels).

    ``w_out_axis``/``w_in_axis`` say which axis of the weight tensor holds output and input
    channels (Gemm transB=1: 0/1; Gemm transB=0 and MatMul: 1/0; Conv: 0/1). A depthwise
    Conv (group == channels) is ``per_channel``: its output stays in its input's group.
    """

    node: str
    op_type: str
    weight: str
    bias: str | None
    input: str
    output: str
    in_space: Space
    out_space: Space
    w_out_axis: int
    w_in_axis: int
    weight_shape: tuple
    per_channel: bool = False
    group: int = 1
    preact: str = ""  # end of the chain of bias Adds after the layer: where REPAIR measures
    bias_chain: list = field(default_factory=list)  # (node name, input index, initializer, sign)
    number: int = 0  # the paper's layer number (1-based, shortcuts share their block's number)
    depth: int = 0  # longest path of weight layers from the inputs, this one included
    topo: int = 0  # position of the node in the graph
    token_mixing: bool = False  # contracts the token axis (MLP-Mixer): its rows are (sample, channel) pairs

    @property
    def kind(self) -> str:
        if self.per_channel:
            return "depthwise"
        if self.op_type == "Gather":
            return "embedding"
        return "conv" if self.op_type == "Conv" else "dense"

    @property
    def in_channels(self) -> int:
        # a space past an op the zip cannot pass (Blocked) has no size: the weight says
        return getattr(self.in_space, "size", 0) or self.weight_shape[self.w_in_axis]

    @property
    def out_channels(self) -> int:
        return self.weight_shape[self.w_out_axis]

    def describe(self) -> str:
        shape = "x".join(str(d) for d in self.weight_shape[2:])
        k = f" {shape}" if shape else ""
        g = " depthwise" if self.per_channel else (f" groups={self.group}" if self.group > 1 else "")
        return f"{self.op_type} {self.in_channels}->{self.out_channels}{k}{g}"


@dataclass
class ChannelParam:
    """A per-channel parameter (BatchNormalization, per-channel Mul/Add, LayerNorm scale/bias)."""

    node: str
    op_type: str
    input_index: int
    initializer: str
    axis: int  # the channel axis inside the initializer
    gid: int
    depth: int = 0
    topo: int = 0
    heads: int = 0  # > 0: one value per attention head of group gid (a relative position bias)
    space: Space | None = None  # a concatenation of groups (LayerNorm after a channel Concat); else gid's group


@dataclass
class FeatureGroup:
    """A merge point: features that share one merge/unmerge."""

    gid: int
    size: int
    producers: list = field(default_factory=list)  # layer indices
    tensors: list = field(default_factory=list)  # (tensor, axis) where the group's features are measured
    output: bool = False  # reaches a graph output: its channels mean the same in every model
    blocked_by: list = field(default_factory=list)  # nodes that cannot zip through it
    attention_heads: int = 1  # > 1: channels form attention heads of size // heads (attention); merges keep heads whole
    attention_tie: int | None = None  # groups with the same tie share one assignment of attention heads
    rotary: bool = False  # attention heads rotated by position (RoPE): channels keep their place within a head
    # rotary by rotate_half on whole heads: channel i of a head turns with channel i + d/2 by one
    # angle, so a merge may turn each such pair (2-D rotations commute) instead of keeping it in place
    rotary_pairs: bool = False
    # grouped-query attention's queries: (the keys' group, repeats). Each key head meets ``repeats``
    # query heads in a row; this group's merge is the keys' merge on every repeat (RepeatSpace)
    repeat_of: tuple | None = None
    aligned: bool = False  # token positions (MLP-Mixer's token mixing): the same in every model, averaged
    # a partition of the channels that merges must respect (grouped convolutions, channel splits):
    # each block a tuple of channel indices; empty: no constraint. Merge and unmerge are block
    # diagonal: a feature is only ever merged with features of its own block, in any model
    blocks: tuple = ()


@dataclass
class Unsupported:
    node: str
    op_type: str
    reason: str
    max_depth: int = 0  # deepest zip still possible before this op


@dataclass
class LayerGraph:
    """What the zip needs to know about one normalized model."""

    model: onnx.ModelProto
    layers: list[Layer]
    groups: dict[int, FeatureGroup]
    params: list[ChannelParam]
    spaces: dict[str, Space]
    shapes: dict[str, tuple]
    unsupported: list[Unsupported]
    inputs: list[str]
    outputs: list[str]
    num_layers: int  # m: the paper's count of layers on the main path
    axes: dict = field(default_factory=dict)  # feature tensor -> its channel axis
    notes: list = field(default_factory=list)  # what normalization changed, in words
    samples: dict = field(default_factory=dict)  # tensor -> (axis, outer, inner): where its samples lie (graph/samples.py)
    pooled: dict = field(default_factory=dict)  # measured tensor -> an axis to average over first (the channels a token MLP carries)

    def sample_layout(self, tensor: str) -> tuple | None:
        """(axis, outer, inner) of ``tensor``'s samples; None for samples alone on axis 0 (or unknown)."""
        layout = self.samples.get(tensor)
        return None if layout is None or tuple(layout) == (0, 1, 1) else tuple(layout)

    def channel_axis(self, tensor: str) -> int | None:
        space = self.spaces.get(tensor)
        if isinstance(space, GroupSpace):
            return space.axis
        return self.axes.get(tensor)

    @functools.cached_property
    def nodes_by_name(self) -> dict[str, onnx.NodeProto]:
        """The model's nodes by name (the model is not edited once parsed)."""
        return {n.name: n for n in self.model.graph.node}

    @functools.cached_property
    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        """Tensor name -> the nodes that read it."""
        found: dict[str, list] = {}
        for n in self.model.graph.node:
            for i in n.input:
                if i:
                    found.setdefault(i, []).append(n)
        return found

    def max_depth(self) -> int:
        """The deepest ``stop_at`` the zip can reach, given unsupported ops."""
        depth = self.num_layers
        for u in self.unsupported:
            depth = min(depth, u.max_depth)
        return depth

    def layer_by_node(self, node: str) -> Layer | None:
        return next((l for l in self.layers if l.node == node), None)

    def measure_points(self) -> list[GroupSpace]:
        """Where each group's statistics are measured, in canonical order.

        The features a group's weight layers read (post-activation; for a residual stream, every
        block's output), or where the group is made when no weight layer reads it (attention's q, k).
        """
        out = []
        for gid, g in self.groups.items():
            for tensor, axis in g.tensors:
                out.append(GroupSpace(gid, g.size, tensor, axis))
        return out
