"""inspect() and check(): the layer graph of a model, and whether two models can be zipped."""

from __future__ import annotations

from onnxzip.errors import OnnxZipError, OptionError
from onnxzip.graph.compare import canonical_weight_shape, first_difference, format_signature, model_labels, space_signature
from onnxzip.graph.layergraph import LayerGraph
from onnxzip.normalize import opset_of

__all__ = ["inspect", "check", "graph_summary", "first_limit"]


def _space_text(space) -> str:
    return format_signature(space_signature(space), group="g")


def _declared_dims(model, name: str) -> list:
    """An input's dimensions as the model declares them: numbers, or names for symbolic ones."""
    for vi in model.graph.input:
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
    return []


def graph_summary(graph: LayerGraph) -> dict:
    """A JSON-ready description of a layer graph."""
    layers = []
    for k, l in enumerate(graph.layers):
        layers.append({
            "index": k,
            "number": l.number,
            "node": l.node,
            "op_type": l.op_type,
            "kind": l.kind,
            "weight": l.weight,
            "weight_shape": list(l.weight_shape),
            "in_channels": l.in_channels,
            "out_channels": l.out_channels,
            "kernel": list(canonical_weight_shape(l)[2:]),
            "input": _space_text(l.in_space),
            "output": _space_text(l.out_space),
            "shortcut": any(o.number == l.number and o.depth > l.depth for o in graph.layers),
        })
    groups = []
    for gid, g in graph.groups.items():
        groups.append({
            "group": gid,
            "channels": g.size,
            "producers": [graph.layers[i].node for i in g.producers],
            "measured_at": [t for t, _ in g.tensors],
            "output": g.output,
            "aligned": g.aligned,
            "attention_heads": g.attention_heads,
            "attention_tie": g.attention_tie,
            "rotary": g.rotary,
            "repeats": list(g.repeat_of) if g.repeat_of else None,
            "passes_through": sorted({p.op_type for p in graph.params if p.gid == gid}),
            "blocked_by": [n for n, _ in g.blocked_by] if not g.output else [],
        })
    return {
        "inputs": {n: _declared_dims(graph.model, n) for n in graph.inputs},
        "limited_by": first_limit(graph),
        "outputs": graph.outputs,
        "opset": opset_of(graph.model),
        "num_layers": graph.num_layers,
        "max_stop_at": graph.max_depth(),
        "layers": layers,
        "groups": groups,
        "channel_params": len(graph.params),
        "unsupported": [
            {"node": u.node, "op_type": u.op_type, "reason": u.reason, "max_stop_at": u.max_depth}
            for u in graph.unsupported
        ],
    }


def first_limit(graph: LayerGraph) -> dict | None:
    """The op that sets the deepest zip (the first in graph order among those allowing the least):
    ``{"node", "op_type", "reason", "max_stop_at"}``, or None when every layer can be zipped."""
    depth = graph.max_depth()
    if depth >= graph.num_layers:
        return None
    u = next(u for u in graph.unsupported if u.max_depth == depth)
    return {"node": u.node, "op_type": u.op_type, "reason": u.reason, "max_stop_at": u.max_depth}


def inspect(model, data=None) -> dict:
    """Describe a model's layer graph (path or ModelProto; ``data`` fixes symbolic input shapes)."""
    from onnxzip.pipeline import load_layer_graph

    return graph_summary(load_layer_graph(model, data))


def _limiting_op(graphs, depth: int) -> str | None:
    """The unsupported op that stops the zip at ``depth``, in words (None when nothing does)."""
    for k, g in enumerate(graphs):
        for u in g.unsupported:
            if u.max_depth == depth and depth < g.num_layers:
                return f"model {model_labels(len(graphs))[k]}'s node '{u.node}' ({u.op_type}): {u.reason}"
    return None


def check(model_a, model_b=None, data=None, input_layout: str | None = None) -> dict:
    """Can the models be zipped? ``{"zippable": bool, "reason": str|None, "notes": [...], ...}``.

    ``check(a, b)`` for two models, ``check([m1, ..., mN])`` for N >= 2 (each compared with the
    first). ``notes``: exporter spellings treated as equivalent (dense kernels [in, out] vs
    [out, in], ``auto_pad`` vs pads, BatchNormalization folded, an input layout aligned, ...), in words.
    """
    from onnxzip.graph.compare import equivalences
    from onnxzip.pipeline import depth_limit, load_layer_graph

    sources = list(model_a) if isinstance(model_a, (list, tuple)) else [model_a, model_b]
    if len(sources) < 2 or any(s is None for s in sources):
        raise OptionError(f"check needs at least 2 models, got {sum(s is not None for s in sources)}")
    loaded, ops, layout_notes = _loaded_for_check(sources, input_layout)
    try:
        layout_notes = layout_notes + _batch_notes(loaded, sources)
        graphs = [load_layer_graph(m, data) for m in loaded]
    except OnnxZipError as e:
        return {"zippable": False, "reason": str(e), "notes": layout_notes}
    diff = _first_difference_of(graphs)
    depth = depth_limit(graphs)
    limit = _limiting_op(graphs, depth)
    if limit is None and depth < min(g.max_depth() for g in graphs):
        layer = graphs[0].layers[depth]
        limit = f"layer {layer.number} ('{layer.node}'): heads of different sizes {[g.layers[depth].out_channels for g in graphs]}"
    if diff is None and depth == 0:
        diff = f"no layer can be shared: {limit}"
    labels = model_labels(len(graphs))
    return {
        "zippable": diff is None,
        "reason": diff,
        "limited_by": limit,
        "notes": layout_notes + [n for k in range(1, len(graphs)) for n in equivalences(graphs[0], graphs[k])],
        "num_layers": graphs[0].num_layers,
        "max_stop_at": depth,
        "opsets": ops,
        "layers": [len(g.layers) for g in graphs],
        "groups": [len(g.groups) for g in graphs],
        "unsupported": [
            {"model": labels[k], "node": u.node, "op_type": u.op_type, "max_stop_at": u.max_depth}
            for k, g in enumerate(graphs) for u in g.unsupported
        ],
    }


def _batch_notes(loaded: list, sources: list) -> list[str]:
    """What a zip will do about the models' batch axes, in words (raises when two static batches differ)."""
    from onnxzip.graph.build import static_batch_of
    from onnxzip.pipeline import static_batch

    batches = [static_batch_of(m) for m in loaded]
    batch = static_batch(batches, [str(s) for s in sources])
    if batch is None or all(b is not None for b in batches):
        return []
    labels = model_labels(len(loaded))
    fixed = ", ".join(l for l, b in zip(labels, batches) if b is not None)
    return [f"batch: {fixed} fixed at {batch}, the others dynamic; a zip makes the static models take any batch "
            f"where their graphs allow it (checked on the calibration data), else the zipped model takes exactly {batch}"]


def _loaded_for_check(sources: list, input_layout: str | None) -> tuple[list, list, list]:
    """The models loaded, at one opset, with one input layout; their opsets; the layout notes."""
    import onnx

    from onnxzip.io import load_model
    from onnxzip.normalize import align_input_layouts, convert_opset

    loaded = [m if isinstance(m, onnx.ModelProto) else load_model(m) for m in sources]
    ops = [opset_of(m) for m in loaded]
    if len(set(ops)) > 1:
        loaded = [convert_opset(m, max(ops), str(src)) for m, src in zip(loaded, sources)]
    loaded, layout_notes = align_input_layouts(loaded, input_layout)
    return loaded, ops, layout_notes


def _first_difference_of(graphs: list) -> str | None:
    """The first difference of any model from the first, naming the model when there are more than two."""
    for k in range(1, len(graphs)):
        diff = first_difference(graphs[0], graphs[k])
        if diff is not None:
            return diff if len(graphs) == 2 else f"model {k + 1} against model 1: {diff}"
    return None
