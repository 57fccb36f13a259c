"""Exceptions raised by onnxzip.

Every problem caused by the user's input (files, data, options) raises a subclass of
:class:`OnnxZipError`. Its message is one line: what is wrong, where, and what to do.
The CLI prints that line and exits with status 1. Bugs in onnxzip itself raise
:class:`InternalError`, which is deliberately *not* an ``OnnxZipError``.
"""

from __future__ import annotations

__all__ = [
    "OnnxZipError",
    "ModelLoadError",
    "ArchitectureMismatchError",
    "UnsupportedOpError",
    "CalibrationDataError",
    "OptionError",
    "OutputPathError",
    "InternalError",
]


class OnnxZipError(Exception):
    """A problem with the user's input; the message says what to do about it."""


class ModelLoadError(OnnxZipError):
    """A model file is missing, is not ONNX, is corrupt or lacks its external data."""


class ArchitectureMismatchError(OnnxZipError):
    """Two models cannot be zipped because their layers differ."""


class UnsupportedOpError(OnnxZipError):
    """An op lies on a path the zip must pass through and onnxzip cannot rewrite it."""


class CalibrationDataError(OnnxZipError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class OptionError(OnnxZipError):
    """An unknown method, or a parameter out of its range."""


class OutputPathError(OnnxZipError):
    """The output path cannot be written (missing folder, or it is one of the inputs)."""


class InternalError(Exception):
    """A bug in onnxzip: please report it with the command that triggered it."""
