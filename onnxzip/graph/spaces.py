"""Feature spaces: what the channel axis of an activation tensor is made of.

A weight layer starts a new feature group (a merge point). Element-wise and per-channel ops
carry a tensor's space to their output; residual Adds unify two groups into one; a Concat on the
channel axis builds a :class:`ConcatSpace`; flattening a C x H x W map into C*H*W features builds
an :class:`ExpandSpace` whose unmerge is ``kron(I_outer, kron(U, I_inner))``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Space", "InputSpace", "NoFeatures", "Blocked", "GroupSpace", "ConcatSpace", "ExpandSpace", "HeadSpace",
    "HeadsOnly", "HeadPart", "StackSpace", "SelectSpace", "RepeatSpace", "leaves", "channel_sources",
]


class Space:
    """Base class of feature spaces; feature spaces have a ``size`` (channel count)."""


@dataclass(frozen=True)
class InputSpace(Space):
    """Tensors computed from the graph inputs only: identical in both models, never merged."""

    size = 0


@dataclass(frozen=True)
class NoFeatures(Space):
    """Shape computations, integer tensors, constants: no channel axis."""


@dataclass(frozen=True)
class Blocked(Space):
    """Downstream of an op the zip cannot pass through."""

    node: str
    op_type: str


@dataclass(frozen=True)
class GroupSpace(Space):
    """The features of one group, measured at ``tensor`` along ``axis``."""

    gid: int
    size: int
    tensor: str
    axis: int


@dataclass(frozen=True)
class ConcatSpace(Space):
    """Channel-axis concatenation of several spaces."""

    parts: tuple
    size: int


@dataclass(frozen=True)
class ExpandSpace(Space):
    """A space repeated across flattened positions: feature index = (o * size + c) * inner + i."""

    part: Space
    outer: int
    inner: int
    size: int


@dataclass(frozen=True)
class SelectSpace(Space):
    """Some channels of a space, in a new order: channel j is channel ``index[j]`` of ``part``.

    A Split or Slice of the channel axis (a contiguous range) or a fixed channel permutation
    (ShuffleNet's channel shuffle, normalized into a Gather). The merged model applies the same
    selection to merged channels, so every group it cuts must be matched within the pieces
    (the builder records the pieces as block constraints of the groups).
    """

    part: Space
    index: tuple
    size: int


@dataclass(frozen=True)
class HeadSpace(Space):
    """A head-structured group split into a head axis and a within-head axis (attention's q, k, v).

    ``gid``'s ``size`` channels are ``heads`` blocks of ``size // heads``; the tensor's head and
    within-head axes are recorded by the builder (``head_axis_of`` and ``axis_of``).
    """

    gid: int
    size: int
    heads: int


@dataclass(frozen=True)
class HeadsOnly(Space):
    """A per-head tensor (attention scores and weights): only its head axis follows the group."""

    gid: int
    heads: int

    @property
    def size(self) -> int:
        return self.heads


@dataclass(frozen=True)
class HeadPart(Space):
    """``width`` of every head's channels, the same positions in each head, of a head-structured
    group whose channels stay in place within heads (rotary). Rotary position embeddings slice
    each head: "rotate_half" into its two halves (Slice, Neg, a Concat of the halves swapped), a
    partial rotary into the rotated channels and the rest. Since the group's merge keeps channel i
    of a head with channel i of other heads, any rearrangement of the within-head axis commutes
    with it; only the head axis must stay whole.
    """

    gid: int
    size: int
    heads: int
    width: int


@dataclass(frozen=True)
class StackSpace(Space):
    """Equal parts of a channel concatenation, each on its own index of a new axis.

    A fused q/k/v projection's output (a :class:`ConcatSpace` of three groups) reshaped to
    ``[..., 3, D]`` or ``[..., 3, heads, D/heads]``: ``parts`` are the groups, ``size`` the channels
    of one part; the builder records the tensor's part axis (``stack_axis_of``), channel axis and,
    with ``heads`` > 1, head axis. Picking one index of the part axis gives that part's group.
    """

    parts: tuple
    size: int
    heads: int = 1


@dataclass(frozen=True)
class RepeatSpace(Space):
    """Grouped-query attention's keys or values, each of ``part``'s ``heads`` heads repeated
    ``repeats`` times in a row: channel ``(g * repeats + i) * d + c`` is ``part``'s channel
    ``g * d + c`` (``d = part.size // heads``).

    ``part`` is a :class:`HeadSpace` while the heads have an axis of their own and a
    :class:`GroupSpace` once they are joined again (the attention output, read by the output
    projection). The merge of a repeat is the part's merge on every repeat: merged head
    ``g * repeats + i`` is made of the models' heads ``h * repeats + i`` with ``h`` the heads
    merged into ``g``.
    """

    part: Space
    heads: int
    repeats: int
    size: int


def leaves(space: Space) -> list[GroupSpace]:
    """The group spaces a (composite) space is made of, in channel order."""
    if isinstance(space, GroupSpace):
        return [space]
    if isinstance(space, ConcatSpace):
        return [leaf for p in space.parts for leaf in leaves(p)]
    if isinstance(space, (ExpandSpace, SelectSpace, RepeatSpace)):
        return leaves(space.part)
    if isinstance(space, StackSpace):
        return [leaf for p in space.parts for leaf in leaves(p)]
    return []


def channel_sources(space: Space) -> list[tuple[int, int]] | None:
    """(group id, channel within the group) of each channel of a space; None for spaces whose
    channels are not group channels (flattened maps, attention heads, model inputs)."""
    if isinstance(space, GroupSpace):
        return [(space.gid, c) for c in range(space.size)]
    if isinstance(space, ConcatSpace):
        out = []
        for p in space.parts:
            sub = channel_sources(p)
            if sub is None:
                return None
            out += sub
        return out
    if isinstance(space, SelectSpace):
        sub = channel_sources(space.part)
        return None if sub is None else [sub[i] for i in space.index]
    return None
