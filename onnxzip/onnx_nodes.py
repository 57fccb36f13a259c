"""Small graph helpers every module uses: a node's attributes, and dead-code removal through
onnx-graphsurgeon."""

from __future__ import annotations

import onnx
from onnx import helper

__all__ = ["attr", "attrs", "prune"]


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


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the nodes and initializers no graph output depends on (onnx-graphsurgeon's
    cleanup); node order, names, opsets and IR version are kept. onnx-graphsurgeon does not carry
    ``metadata_props`` through its export: they are copied back."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(model.metadata_props)
    return out
