"""Small graph helpers every module uses: a node's attributes; dead-code removal and topological
order through onnx-graphsurgeon."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxzip.errors import ModelLoadError

__all__ = ["attr", "attrs", "consumers", "conv_pads", "prune", "toposort"]


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


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of the main graph that read it, in node order."""
    found: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                found.setdefault(i, []).append(n)
    return found


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the nodes and initializers no graph output depends on (onnx-graphsurgeon's
    cleanup); node order, names, opsets and IR version are kept. onnx-graphsurgeon does not carry
    ``metadata_props`` through its export: they are copied back."""
    graph = gs.import_onnx(model)
    graph.cleanup()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(model.metadata_props)
    return out


def toposort(m: onnx.ModelProto) -> None:
    """Order nodes so that every tensor is produced before it is used (onnx-graphsurgeon's
    toposort; the node protos themselves are kept as they are)."""
    g = m.graph
    available = {t.name for t in g.initializer} | {i.name for i in g.input} | {""}
    available |= {o for n in g.node for o in n.output}
    missing = next((i for n in g.node for i in n.input if i not in available), None)
    if missing is not None:
        raise ModelLoadError(f"the graph uses tensor '{missing}' that nothing produces; the model is malformed, re-export it")
    graph = gs.import_onnx(onnx.ModelProto(graph=onnx.GraphProto(node=g.node, input=g.input, output=g.output), opset_import=m.opset_import))
    position = {id(node): k for k, node in enumerate(graph.nodes)}
    try:
        graph.toposort()
    except Exception as e:  # a cycle
        raise ModelLoadError(f"the graph has a cycle ({e}); the model is malformed, re-export it") from None
    order = [g.node[position[id(node)]] for node in graph.nodes]
    del g.node[:]
    g.node.extend(order)


def conv_pads(node, in_shape, kernel, strides, dilations) -> list[int]:
    """Explicit begin/end pads, whatever the spelling (``pads`` or ``auto_pad``)."""
    nd = len(kernel)
    auto = attr(node, "auto_pad", "NOTSET") or "NOTSET"
    if auto == "VALID":
        return [0] * (2 * nd)
    if auto in ("SAME_UPPER", "SAME_LOWER") and in_shape is not None and len(in_shape) == nd + 2:
        begins, ends = [], []
        for i in range(nd):
            size = in_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    return [int(p) for p in (attr(node, "pads", None) or [0] * (2 * nd))]
