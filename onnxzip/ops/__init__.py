"""Op handlers: how each ONNX op carries feature spaces, one module per op family."""

from onnxzip.ops.registry import get_handler, register, supported_ops
from onnxzip.ops import attention_op, elementwise, layers, norm, shape  # noqa: F401  (registers the handlers)

__all__ = ["get_handler", "register", "supported_ops"]
