"""onnxzip: merge ONNX models of the same architecture, trained on different tasks, into one
multi-task model without training (ZipIt!, Stoica et al., ICLR 2024)."""

from onnxzip.version import __version__  # noqa: E402

from onnxzip.errors import InternalError, OnnxZipError  # noqa: E402
from onnxzip.matchers import match  # noqa: E402  (onnxzip.match(correlation, method, **params))
from onnxzip.matchers import list_matchers  # noqa: E402
from onnxzip.pipeline import ZipResult, prepare_pair, zip_prepared  # noqa: E402
from onnxzip.workflow import zip_models  # noqa: E402
from onnxzip.describe import check, inspect  # noqa: E402

__all__ = [
    "__version__", "zip_models", "prepare_pair", "zip_prepared", "ZipResult", "match", "list_matchers",
    "OnnxZipError", "InternalError", "inspect", "check",
]
