"""Labeled task data: loading an .npz of inputs and labels, and fitting arrays to a model's inputs."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxzip.errors import CalibrationDataError
from onnxzip.runtime import session, session_inputs

__all__ = ["TaskData", "load_task_data", "prepare_feed", "check_labels", "sample_count"]

#: One task's evaluation data: (inputs by input name, integer labels [N]).
TaskData = tuple[dict[str, np.ndarray], np.ndarray]


def _map_input_names(
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    specs: Mapping[str, tuple[type, tuple[int | None, ...]]],
    where: str,
) -> dict[str, np.ndarray]:
    """Renames data keys to the model's input names (any name goes for a single-input model)."""
    if isinstance(inputs, np.ndarray):
        inputs = {"input": inputs}
    names = list(specs)
    keys = list(inputs)
    if len(names) == 1 and len(keys) == 1:
        return {names[0]: inputs[keys[0]]}
    if set(keys) != set(names):
        missing = sorted(set(names) - set(keys))
        extra = sorted(set(keys) - set(names))
        raise CalibrationDataError(
            f"{where}: data keys {sorted(keys)} do not match the model's inputs {names} "
            f"(missing {missing}, unexpected {extra}); name the arrays after the model's inputs"
        )
    return {name: inputs[name] for name in names}


def prepare_feed(
    inputs: Mapping[str, np.ndarray] | np.ndarray,
    specs: Mapping[str, tuple[type, tuple[int | None, ...]]],
    where: str = "input data",
) -> dict[str, np.ndarray]:
    """Checks data against a model's inputs and casts it to their dtypes.

    Keys must equal the model's input names, except for a single-input model where the one array may
    have any name. Axis 0 is the sample axis; all inputs must have the same number of samples; float
    data must be finite; the dtype must cast to the input's dtype (numpy ``same_kind``); the rank and
    every static dimension except the batch must match.

    Raises:
        CalibrationDataError: with what is wrong, where, and what to do.
    """
    feed = _map_input_names(inputs, specs, where)
    n = None
    out = {}
    for name, arr in feed.items():
        arr = np.asarray(arr)
        dtype, shape = specs[name]
        if arr.ndim == 0:
            raise CalibrationDataError(
                f"{where}: array for input '{name}' is a scalar; axis 0 must be the sample axis"
            )
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise CalibrationDataError(
                f"{where}: inputs have different numbers of samples ({n} and {arr.shape[0]} for "
                f"'{name}'); every array needs the same length on axis 0"
            )
        if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
            raise CalibrationDataError(
                f"{where}: array for input '{name}' has dtype {arr.dtype}, which does not convert to "
                f"the model's {np.dtype(dtype).name}; save it as {np.dtype(dtype).name}"
            )
        if shape:
            if arr.ndim != len(shape):
                raise CalibrationDataError(
                    f"{where}: array for input '{name}' has shape {list(arr.shape)} but the model "
                    f"expects rank {len(shape)} {_fmt_shape(shape)}; reshape the data"
                )
            for axis in range(1, len(shape)):
                if shape[axis] is not None and arr.shape[axis] != shape[axis]:
                    raise CalibrationDataError(
                        f"{where}: array for input '{name}' has shape {list(arr.shape)} but the "
                        f"model expects {_fmt_shape(shape)} (axis {axis}); resize or re-export"
                    )
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise CalibrationDataError(
                f"{where}: array for input '{name}' contains {bad} NaN or infinite values; clean "
                f"the data"
            )
        out[name] = arr.astype(dtype, copy=False)
    return out


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def sample_count(feed: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0


def check_labels(labels: Any, n: int | None, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise CalibrationDataError(
            f"{where}: labels have shape {list(labels.shape)}; they must be one integer class per "
            f"sample, shape [N]"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(
            labels == np.round(labels)
        ):
            labels = labels.astype(np.int64)
        else:
            raise CalibrationDataError(
                f"{where}: labels have dtype {labels.dtype}; save them as integer class indices"
            )
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise CalibrationDataError(
            f"{where}: labels contain negative values (min {labels.min()}); labels are class indices "
            f"0..classes-1 of the task's head"
        )
    if n is not None and labels.shape[0] != n:
        raise CalibrationDataError(
            f"{where}: {labels.shape[0]} labels for {n} samples; every sample needs one label"
        )
    return labels


def load_task_data(
    path: str | os.PathLike[str],
    model=None,
) -> TaskData:
    """Loads one task's evaluation data from an .npz file.

    The file holds the model's input(s) and ``labels`` (integers, axis 0 = samples). For a
    single-input model the input array may have any name; otherwise the keys must equal the model's
    input names.

    Args:
        path: the .npz file.
        model: the model the data is for (path, ModelProto or ModelPredictor). When given, keys are
            renamed to its input names and the arrays are checked and cast against its inputs.

    Returns:
        ``(inputs, labels)``: input name -> array, and int64 labels ``[N]``.

    Raises:
        CalibrationDataError: the file is missing or unreadable, ``labels`` is missing, sample counts
            differ, inputs are not finite, or a dtype/shape does not fit the model.
    """
    where = f"'{os.fspath(path)}'"
    if not os.path.isfile(path):
        raise CalibrationDataError(f"data file {where} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationDataError(
            f"cannot read {where} as .npz ({exc}); save the data with numpy.savez"
        ) from None
    if "labels" not in arrays:
        raise CalibrationDataError(
            f"{where} has no 'labels' array (keys: {sorted(arrays)}); add the integer class of "
            f"every sample as 'labels'"
        )
    labels = arrays.pop("labels")
    if not arrays:
        raise CalibrationDataError(f"{where} holds only 'labels'; add the model's input array(s)")
    if model is None:
        inputs = {}
        n = None
        for k, v in arrays.items():
            v = np.asarray(v)
            if v.ndim == 0:
                raise CalibrationDataError(
                    f"{where}: array '{k}' is a scalar; axis 0 must be the sample axis"
                )
            if n is not None and v.shape[0] != n:
                raise CalibrationDataError(
                    f"{where}: arrays have different numbers of samples ({n} and {v.shape[0]} for "
                    f"'{k}'); every array needs the same length on axis 0"
                )
            n = v.shape[0]
            if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
                raise CalibrationDataError(
                    f"{where}: array '{k}' contains NaN or infinite values; clean the data"
                )
            if not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
                raise CalibrationDataError(
                    f"{where}: array '{k}' has non-numeric dtype {v.dtype}; save numeric arrays"
                )
            inputs[k] = v
    else:
        if hasattr(model, "input_specs"):  # a predictor that already has a session
            specs = model.input_specs
        else:
            specs = session_inputs(session(model))
        inputs = prepare_feed(arrays, specs, where=where)
        n = sample_count(inputs)
    labels = check_labels(labels, n, where)
    return inputs, labels
