"""The one place onnxruntime sessions are made (statistics, probes, repair, validation, scoring,
evaluation, latency)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import onnx

from onnxzip.errors import ModelLoadError, OptionError
from onnxzip.io import session_source

__all__ = ["session", "session_inputs", "describe_model", "OPTIMIZATION_LEVELS"]

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def session(model, providers: Sequence[str] | None = None, *, optimization: str = "basic",
            threads: int | None = None, arena: bool = True, spinning: bool = True):
    """An onnxruntime session for a model file (its external data resolved next to it) or a
    ModelProto (one over the protobuf limit runs from a temporary external-data copy that lives as
    long as the session).

    Args:
        providers: execution providers; default ``["CPUExecutionProvider"]``.
        optimization: graph optimization level, one of :data:`OPTIMIZATION_LEVELS`.
        threads: intra-op threads (None or 0: onnxruntime's default, one per core).
        arena: False returns memory to the system after each run (an arena keeps a run's peak
            for the session's life).
        spinning: False stops worker threads busy-waiting between runs (numpy works on the
            results in between, on the same cores).

    Raises:
        ModelLoadError: the file is missing or onnxruntime cannot load the model.
        OptionError: an unknown optimization level or a bad thread count.
    """
    import onnxruntime as ort

    levels = dict(zip(OPTIMIZATION_LEVELS, (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)))
    if optimization not in levels:
        raise OptionError(f"unknown graph optimization level '{optimization}'; use one of {list(OPTIMIZATION_LEVELS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 0):
        raise OptionError(f"intra_op_threads must be a non-negative integer (0 = onnxruntime's default), got {threads!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source, holder = _source(model)
    try:
        sess = ort.InferenceSession(source, opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"onnxruntime cannot load {describe_model(model)}: {first}; check that the file is a valid ONNX model "
            "and that its ops and opset are supported by this onnxruntime") from None
    sess._onnxzip_keep = holder  # the temporary copy, if any, lives as long as the session
    return sess


def _source(model) -> tuple[Any, Any]:
    if isinstance(model, onnx.ModelProto):
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            raise ModelLoadError(f"{describe_model(model)} references external data that is not loaded; pass the "
                                 "model's file path instead so the data is found next to it")
        return session_source(model)
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file '{path}' does not exist; check the path")
    return path, None


def describe_model(model) -> str:
    """A model in messages: its path, or its graph name when it is in memory."""
    if isinstance(model, onnx.ModelProto):
        return f"in-memory model '{model.graph.name or '<unnamed graph>'}'"
    return f"'{os.fspath(model)}'"


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def session_inputs(sess) -> dict[str, tuple[type, tuple[int | None, ...]]]:
    """Input name -> (numpy dtype, shape with ``None`` for dynamic dims) of an onnxruntime session."""
    specs = {}
    for inp in sess.get_inputs():
        dtype = _ORT_TO_NUMPY.get(inp.type)
        if dtype is None:
            raise ModelLoadError(
                f"model input '{inp.name}' has type {inp.type}, which onnxzip cannot feed; only "
                f"tensor inputs of numeric types are supported"
            )
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (inp.shape or ()))
        specs[inp.name] = (dtype, shape)
    return specs
