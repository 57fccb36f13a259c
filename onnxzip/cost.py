"""Cost of a model read from its graph: parameters, FLOPs per sample, and measured latency.

Used to compare source models, their ensemble and zipped models (a zipped trunk is shared, so a model
zipped deeper costs less than running both sources).

**Parameters** (:func:`count_params`): elements of the float initializers that nodes use, each
initializer counted once however many nodes use it.

**FLOPs** (:func:`count_flops`) are counted for one sample: symbolic/dynamic batch dimensions are fixed
to 1 before onnx shape inference (on a copy; the caller's model is untouched). A model with a static
batch B is counted at B and divided by B. A multiply-add is 2 FLOPs. ``out`` is the number of output
elements, ``in`` the number of elements of the first input.

========================================================  ==================================================
op type                                                   FLOPs
========================================================  ==================================================
Conv, ConvInteger, QLinearConv                            2 * out * (C_in / group * prod(kernel)) (+ out if bias)
ConvTranspose                                             2 * in * (C_out / group * prod(kernel)) (+ out if bias)
Gemm                                                      2 * M * K * N (+ M * N if C is given)
MatMul, MatMulInteger, QLinearMatMul                      2 * out * K (batch dims included in out)
Einsum                                                    2 * prod(size of every index) (no ``...``)
Add, Sub, Mul, Div, Pow, Sqrt, Relu, Clip, Sigmoid,       1 per output element
Tanh, Gelu, Erf, LeakyRelu, HardSwish, HardSigmoid,
Exp, Log, Neg, Abs, Reciprocal, PRelu, Elu, Selu,
Softplus, Mish, Where
Max, Min, Sum, Mean (n inputs)                            n - 1 per output element (Mean: n)
BatchNormalization                                        2 per element
LayerNormalization, InstanceNormalization,                5 per element
GroupNormalization
Softmax, LogSoftmax                                       3 per element
MaxPool, AveragePool, LpPool                              prod(kernel) per output element
GlobalAveragePool, GlobalMaxPool, ReduceMean, ReduceSum,  in (one per input element)
ReduceMax, ReduceMin, ReduceProd, ReduceL1, ReduceL2,
ReduceSumSquare, ArgMax, ArgMin
Shape, Size, Gather, GatherElements, Reshape, Flatten,    0 (shape-only or data movement)
Transpose, Squeeze, Unsqueeze, Concat, Constant,
ConstantOfShape, Identity, Cast, CastLike, Slice, Split,
Pad, Expand, Tile, Dropout, Range
========================================================  ==================================================

Shapes that onnx shape inference leaves unknown (e.g. a Hugging Face BERT's position ids, sliced to a
length computed from ``Shape``) are measured by one onnxruntime run of the same small copy on zeros
(weights included: shapes do not depend on values; the file's external data is not read). That run
needs every input dimension: batch 1 and ``dims`` for the other symbolic ones. A node whose shapes are
still unknown counts 0 and is listed in :attr:`FlopReport.unknown`; an op type outside the table counts
0 and is listed in :attr:`FlopReport.uncounted`.

**Latency** (:func:`measure_latency`): onnxruntime with graph optimization ENABLE_ALL, median and p90
wall time of one batch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import onnx

from onnxzip.errors import CalibrationDataError, ModelLoadError, OptionError
from onnxzip.evaluate import prepare_feed
from onnxzip.onnx_nodes import attr
from onnxzip.runtime import session as runtime_session
from onnxzip.runtime import session_inputs

__all__ = ["FlopReport", "count_params", "count_flops", "measure_latency"]

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]
Shape = tuple[int, ...]

_FLOAT_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT4E2M1",
    )
    if hasattr(onnx.TensorProto, name)
}

# Float initializers above this many elements are replaced by typed graph inputs for shape inference:
# their values are never needed for shapes, and leaving them out keeps the copy small (and under 2 GB).
_KEEP_VALUES_UP_TO = 64


def _load_structure(model: ModelLike) -> onnx.ModelProto:
    """The model itself, or the graph of a file without its external data (dims suffice here)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file '{path}' does not exist; check the path")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(
            f"cannot read '{path}' as an ONNX model ({type(exc).__name__}: {exc}); check that the "
            f"file is a valid .onnx model"
        ) from None


def _used_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    for node in graph.node:
        into.update(i for i in node.input if i)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _used_names(a.g, into)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _used_names(g, into)
    return into


def count_params(model: ModelLike) -> int:
    """Number of parameters: elements of the float initializers used by nodes, each counted once.

    Args:
        model: a ModelProto or a path (external data is not read: only the dims are needed).

    Raises:
        ModelLoadError: the file is missing or not ONNX.
    """
    proto = _load_structure(model)
    used = _used_names(proto.graph, set())
    seen: set[str] = set()
    total = 0
    for init in proto.graph.initializer:
        if init.name in used and init.name not in seen and init.data_type in _FLOAT_TYPES:
            seen.add(init.name)
            total += math.prod(init.dims)
    return int(total)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


@dataclass
class FlopReport:
    """FLOPs of one sample (batch 1).

    Attributes:
        total: FLOPs of the whole graph.
        by_op_type: op type -> FLOPs (op types counted as 0 are included when present).
        by_node: node name (``<op_type>#<index>`` when unnamed) -> FLOPs.
        unknown: nodes whose shapes could not be inferred (counted as 0).
        uncounted: op types outside the cost table -> number of nodes (counted as 0).
        batch: the batch size shapes were inferred at (totals are divided by it).
    """

    total: int
    by_op_type: dict[str, int]
    by_node: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    uncounted: dict[str, int] = field(default_factory=dict)
    batch: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "total": self.total,
            "by_op_type": dict(self.by_op_type),
            "by_node": dict(self.by_node),
            "unknown": list(self.unknown),
            "uncounted": dict(self.uncounted),
            "batch": self.batch,
        }


class _Shapes:
    """Name -> static shape (``None`` when unknown) after shape inference."""

    def __init__(self, graph: onnx.GraphProto, initializers: Sequence[onnx.TensorProto]) -> None:
        self._shapes: dict[str, Shape | None] = {}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            self._shapes[vi.name] = self._from_value_info(vi)
        for init in initializers:
            self._shapes[init.name] = tuple(int(d) for d in init.dims)

    @staticmethod
    def _from_value_info(vi: onnx.ValueInfoProto) -> Shape | None:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            return None
        dims = []
        for d in t.shape.dim:
            if not d.HasField("dim_value") or d.dim_value < 0:
                return None
            dims.append(int(d.dim_value))
        return tuple(dims)

    def get(self, name: str) -> Shape | None:
        return self._shapes.get(name) if name else None

    def fill(self, measured: Mapping[str, Shape]) -> None:
        """Take ``measured`` shapes for the names inference left unknown."""
        for name, shape in measured.items():
            if self._shapes.get(name) is None:
                self._shapes[name] = shape


def _has_input(node: onnx.NodeProto, i: int) -> bool:
    return len(node.input) > i and bool(node.input[i])


_Handler = Callable[[onnx.NodeProto, _Shapes], Union[int, None]]
_HANDLERS: dict[str, _Handler] = {}
_ZERO_OPS = frozenset(
    "Shape Size Gather GatherElements GatherND Reshape Flatten Transpose Squeeze Unsqueeze Concat "
    "Constant ConstantOfShape Identity Cast CastLike Slice Split Pad Expand Tile Dropout Range".split()
)


def _register(*op_types: str) -> Callable[[_Handler], _Handler]:
    """Registers a FLOP handler: (node, shapes) -> FLOPs, or None when a shape is unknown."""

    def wrap(fn: _Handler) -> _Handler:
        for op in op_types:
            _HANDLERS[op] = fn
        return fn

    return wrap


def _numel(shape: Shape | None) -> int | None:
    return None if shape is None else math.prod(shape)


def _per_output_element(per: int) -> _Handler:
    def handler(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
        out = _numel(shapes.get(node.output[0]))
        return None if out is None else per * out

    return handler


def _per_input_element(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    return _numel(shapes.get(node.input[0]))


for _op in (
    "Add Sub Mul Div Pow Sqrt Relu Clip Sigmoid Tanh Gelu Erf LeakyRelu HardSwish HardSigmoid Exp Log "
    "Neg Abs Reciprocal PRelu Elu Selu Softplus Mish Where"
).split():
    _HANDLERS[_op] = _per_output_element(1)
_HANDLERS["BatchNormalization"] = _per_output_element(2)
for _op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization"):
    _HANDLERS[_op] = _per_output_element(5)
for _op in ("Softmax", "LogSoftmax"):
    _HANDLERS[_op] = _per_output_element(3)
for _op in (
    "GlobalAveragePool GlobalMaxPool ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 "
    "ReduceL2 ReduceSumSquare ArgMax ArgMin"
).split():
    _HANDLERS[_op] = _per_input_element


@_register("Max", "Min", "Sum", "Mean")
def _variadic(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    out = _numel(shapes.get(node.output[0]))
    n = sum(1 for i in node.input if i)
    if out is None:
        return None
    return out * (n if node.op_type == "Mean" else max(n - 1, 1))


def _conv_like(node: onnx.NodeProto, shapes: _Shapes, w_index: int, b_index: int) -> int | None:
    out = shapes.get(node.output[0])
    w = shapes.get(node.input[w_index])
    if out is None or w is None or len(w) < 2:
        return None
    flops = 2 * math.prod(out) * w[1] * math.prod(w[2:])  # w[1] is already C_in / group
    if _has_input(node, b_index):
        flops += math.prod(out)
    return flops


@_register("Conv", "ConvInteger")
def _conv(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    return _conv_like(node, shapes, 1, 2)


@_register("QLinearConv")
def _qlinear_conv(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    return _conv_like(node, shapes, 3, 8)


@_register("ConvTranspose")
def _conv_transpose(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    x = shapes.get(node.input[0])
    w = shapes.get(node.input[1])  # [C_in, C_out / group, k...]
    out = shapes.get(node.output[0])
    if x is None or w is None or out is None or len(w) < 2:
        return None
    flops = 2 * math.prod(x) * w[1] * math.prod(w[2:])
    if _has_input(node, 2):
        flops += math.prod(out)
    return flops


@_register("Gemm")
def _gemm(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    a = shapes.get(node.input[0])
    b = shapes.get(node.input[1])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else a
    n = b[0] if attr(node, "transB", 0) else b[1]
    flops = 2 * m * k * n
    if _has_input(node, 2):
        flops += m * n
    return flops


@_register("MatMul", "MatMulInteger", "QLinearMatMul")
def _matmul(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    a = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    if a is None or out is None or not a:
        return None
    return 2 * math.prod(out) * a[-1]


@_register("Einsum")
def _einsum(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    equation = str(attr(node, "equation", ""))
    lhs = equation.replace(" ", "").split("->")[0]
    if "..." in lhs:
        return None
    sizes: dict[str, int] = {}
    terms = lhs.split(",")
    for term, name in zip(terms, node.input):
        shape = shapes.get(name)
        if shape is None or len(shape) != len(term):
            return None
        for letter, d in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), d)
    total = math.prod(sizes.values())
    return 2 * total if len(terms) > 1 else total


@_register("MaxPool", "AveragePool", "LpPool")
def _pool(node: onnx.NodeProto, shapes: _Shapes) -> int | None:
    out = _numel(shapes.get(node.output[0]))
    kernel = attr(node, "kernel_shape")
    if out is None or not kernel:
        return None
    return out * math.prod(kernel)


def _inference_copy(
    proto: onnx.ModelProto, dims: Mapping[str, int] | None
) -> tuple[onnx.ModelProto, int]:
    """A small copy of the model for shape inference, its batch dims fixed; also the batch used."""
    m = onnx.ModelProto()
    m.ir_version = proto.ir_version
    m.opset_import.extend(proto.opset_import)
    m.functions.extend(proto.functions)
    g = m.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    init_names = {t.name for t in proto.graph.initializer}
    dims = dict(dims or {})
    batches = set()
    for vi in proto.graph.input:
        if vi.name in init_names:
            continue  # IR < 4 lists initializers as inputs: they come below
        new = g.input.add()
        new.CopyFrom(vi)
        if not new.type.HasField("tensor_type") or not new.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(new.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                if axis == 0:
                    batches.add(int(d.dim_value))
                continue
            if d.HasField("dim_param") and d.dim_param in dims:
                value = int(dims[d.dim_param])
            elif axis == 0:
                value = 1  # symbolic or dynamic batch: one sample
            else:
                continue
            d.Clear()
            d.dim_value = value
            if axis == 0:
                batches.add(value)
    for out in proto.graph.output:  # keep names and types, drop shapes (they may name old dims)
        new = g.output.add()
        new.name = out.name
        if out.type.HasField("tensor_type"):
            new.type.tensor_type.elem_type = out.type.tensor_type.elem_type
    for init in proto.graph.initializer:
        if init.data_type in _FLOAT_TYPES and math.prod(init.dims) > _KEEP_VALUES_UP_TO:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
        else:
            g.initializer.append(init)
    batch = batches.pop() if len(batches) == 1 else 1
    return m, batch


def count_flops(model: ModelLike, dims: Mapping[str, int] | None = None) -> FlopReport:
    """FLOPs of one sample, from onnx shape inference (see the module docstring for the cost table).

    Args:
        model: a ModelProto (not modified) or a path (external data is not read).
        dims: values for other symbolic dimensions, by name (e.g. ``{"seq": 128}``); the batch
            dimension (axis 0 of every input) is fixed to 1 when it is not static.

    Returns:
        A :class:`FlopReport`.

    Raises:
        ModelLoadError: the file is missing or not ONNX.
    """
    proto = _load_structure(model)
    copy, batch = _inference_copy(proto, dims)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            copy, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception:  # inference failed as a whole: every node will be unknown
        inferred = copy
    shapes = _Shapes(inferred.graph, proto.graph.initializer)
    report = _count(proto, shapes, batch)
    if report.unknown:
        base_dir = None if isinstance(model, onnx.ModelProto) else os.path.dirname(os.fspath(model))
        measured = _run_shapes(copy, base_dir)
        if measured:
            shapes.fill(measured)
            report = _count(proto, shapes, batch)
    return report


def _run_shapes(copy: onnx.ModelProto, base_dir: str | None) -> dict[str, Shape]:
    """Every node output's shape from one onnxruntime run of the inference copy on zeros (its large
    float initializers are inputs there, fed zeros too; the small ones it keeps are read from
    external data in ``base_dir`` where they live there); {} when an input dimension is still
    symbolic or the copy does not run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(copy)
    for init in probe.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            if base_dir is None:
                return {}
            try:
                onnx.external_data_helper.load_external_data_for_tensor(init, base_dir)
            except (OSError, ValueError):
                return {}
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    names = list(dict.fromkeys(o for n in probe.graph.node for o in n.output if o))
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    feeds = {}
    for vi in probe.graph.input:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not vi.type.HasField("tensor_type") or not t.HasField("shape") or min(dims, default=0) < 0:
            return {}
        feeds[vi.name] = np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    try:
        sess = runtime_session(probe, optimization="disable")
        values = sess.run(names, feeds)
    except Exception:  # noqa: BLE001 - any failure leaves the shapes unknown, as before
        return {}
    return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(names, values)}


def _count(proto: onnx.ModelProto, shapes: _Shapes, batch: int) -> FlopReport:
    by_op: dict[str, int] = {}
    by_node: dict[str, int] = {}
    unknown: list[str] = []
    uncounted: dict[str, int] = {}
    for index, node in enumerate(proto.graph.node):
        name = node.name or f"{node.op_type}#{index}"
        if name in by_node:
            name = f"{name}#{index}"
        handler = _HANDLERS.get(node.op_type)
        flops: int | None = 0
        if node.op_type in _ZERO_OPS:
            flops = 0
        elif handler is None:
            uncounted[node.op_type] = uncounted.get(node.op_type, 0) + 1
        else:
            try:
                flops = handler(node, shapes)
            except (IndexError, TypeError, ValueError):
                flops = None
            if flops is None:
                unknown.append(name)
                flops = 0
        flops = int(round(flops / batch))
        by_node[name] = flops
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
    return FlopReport(
        total=int(sum(by_node.values())),
        by_op_type=dict(sorted(by_op.items(), key=lambda kv: (-kv[1], kv[0]))),
        by_node=by_node,
        unknown=unknown,
        uncounted=uncounted,
        batch=batch,
    )


# --------------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------------


def measure_latency(
    model: ModelLike,
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    providers: Sequence[str] | None = None,
    warmup: int = 3,
    repeats: int = 20,
    *,
    intra_op_threads: int | None = None,
) -> dict[str, Any]:
    """Wall time of one batch through onnxruntime (graph optimization ENABLE_ALL).

    Args:
        model: a path (external data resolves next to it) or a loaded ModelProto.
        inputs: one batch: input name -> array (any name for a single-input model), or one array.
        providers: onnxruntime execution providers; default CPU.
        warmup: untimed runs first.
        repeats: timed runs.
        intra_op_threads: onnxruntime intra-op threads (``None``: onnxruntime's default).

    Returns:
        ``{"median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "repeats", "warmup", "batch",
        "providers", "intra_op_threads"}``; ``providers`` are those the session really uses.

    Raises:
        OptionError: bad warmup/repeats/threads.
        CalibrationDataError: inputs that do not fit the model.
        ModelLoadError: the model cannot be loaded.
    """
    if not isinstance(warmup, int) or warmup < 0:
        raise OptionError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise OptionError(f"repeats must be a positive integer, got {repeats!r}")
    session = runtime_session(model, providers, threads=intra_op_threads, optimization="all")
    specs = session_inputs(session)
    feed = prepare_feed(inputs, specs, where="latency inputs")
    batch = int(next(iter(feed.values())).shape[0])
    for name, (_, shape) in specs.items():
        if shape and shape[0] is not None and feed[name].shape[0] != shape[0]:
            raise CalibrationDataError(
                f"latency inputs: input '{name}' has a static batch of {shape[0]} but {batch} samples "
                f"were given; time batches of exactly {shape[0]}"
            )
    outputs = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(outputs, feed)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        session.run(outputs, feed)
        times[i] = (time.perf_counter() - start) * 1e3
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(times.mean()),
        "min_ms": float(times.min()),
        "max_ms": float(times.max()),
        "repeats": repeats,
        "warmup": warmup,
        "batch": batch,
        "providers": list(session.get_providers()),
        "intra_op_threads": intra_op_threads,
    }
