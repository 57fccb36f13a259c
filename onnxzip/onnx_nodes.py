"""Reading a node's attributes: the one helper every module uses."""

from __future__ import annotations

import onnx
from onnx import helper

__all__ = ["attr", "attrs"]


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (strings decoded), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def attrs(node: onnx.NodeProto) -> dict:
    """Every attribute of ``node`` by name, as ``helper.make_node`` takes them (strings undecoded)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
