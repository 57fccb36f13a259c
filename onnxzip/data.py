"""Calibration and evaluation data: .npz files (or folders of .npz shards) streamed in batches.

An .npz holds one array per graph input (axis 0 = samples); a model with a single input
accepts any single array name. An optional ``labels`` array is ignored here. Data may come as
one mixed, unlabeled set, or one set per task (``{"a": "a.npz", "b": "b.npz"}``).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from onnxzip.errors import CalibrationDataError

__all__ = ["InputSpec", "DataSet", "Batch", "open_data", "LABEL_KEYS"]

LABEL_KEYS = ("labels", "label", "y")


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, dims (None where symbolic) and numpy dtype."""

    name: str
    dims: tuple
    dtype: type


@dataclass
class Batch:
    feeds: dict  # input name -> array, exactly the model's batch size when it is static
    valid: np.ndarray  # bool per row: False for padding rows
    task: np.ndarray  # int per row: index of the task the row belongs to, -1 when unknown


def _shards(path: Path) -> list[Path]:
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such file or folder; pass an .npz file or a folder of .npz shards")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if not files:
            raise CalibrationDataError(f"{path}: the folder holds no .npz files")
        return files
    return [path]


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CalibrationDataError(f"{path}: not a readable .npz file ({e}); save the data with numpy.savez") from e


class DataSet:
    """One or more .npz sources, validated against a model's inputs."""

    def __init__(self, sources: list[tuple[str | None, Path]], inputs: list[InputSpec]):
        self.inputs = inputs
        self.sources = []  # (task index or -1, task name, shard paths)
        self.task_names: list[str] = []
        for task, path in sources:
            idx = -1
            if task is not None:
                idx = len(self.task_names)
                self.task_names.append(task)
            self.sources.append((idx, task, _shards(Path(path))))
        self.num_samples = 0
        for _, _, shards in self.sources:
            for shard in shards:
                self.num_samples += self._check_shard(shard)
        if self.num_samples == 0:
            raise CalibrationDataError("the data holds no samples; pass at least one sample per input")

    @property
    def per_task(self) -> bool:
        return bool(self.task_names)

    def _keys(self, path: Path, files) -> dict[str, str]:
        keys = [k for k in files.files if k not in LABEL_KEYS]
        names = [i.name for i in self.inputs]
        if len(names) == 1 and len(keys) == 1:
            return {names[0]: keys[0]}
        missing = [n for n in names if n not in keys]
        if missing:
            raise CalibrationDataError(
                f"{path}: missing array(s) {missing} for the model's input(s); found {keys} "
                f"(name the arrays after the inputs: {names})"
            )
        return {n: n for n in names}

    def _check_shard(self, path: Path) -> int:
        with _open_npz(path) as files:
            counts = set()
            for name, key in self._keys(path, files).items():
                arr = files[key]
                spec = next(i for i in self.inputs if i.name == name)
                if arr.ndim != len(spec.dims):
                    raise CalibrationDataError(
                        f"{path}: array '{key}' has shape {list(arr.shape)} but input '{name}' has rank "
                        f"{len(spec.dims)} {_fmt_dims(spec.dims)}; reshape the data"
                    )
                for k, (got, want) in enumerate(zip(arr.shape[1:], spec.dims[1:]), start=1):
                    if want is not None and got != want:
                        raise CalibrationDataError(
                            f"{path}: array '{key}' has shape {list(arr.shape)}, input '{name}' expects "
                            f"{_fmt_dims(spec.dims)} (axis {k}); resize or re-export"
                        )
                if np.issubdtype(spec.dtype, np.floating):
                    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                        raise CalibrationDataError(f"{path}: array '{key}' has dtype {arr.dtype}; input '{name}' needs numbers ({np.dtype(spec.dtype).name})")
                    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                        raise CalibrationDataError(f"{path}: array '{key}' contains NaN or Inf; clean the data")
                elif arr.dtype != spec.dtype and not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                    raise CalibrationDataError(f"{path}: array '{key}' has dtype {arr.dtype}; input '{name}' needs {np.dtype(spec.dtype).name}")
                counts.add(arr.shape[0])
            if len(counts) != 1:
                raise CalibrationDataError(f"{path}: the input arrays have different numbers of samples {sorted(counts)}")
            return counts.pop()

    def batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Batch]:
        """Yield batches; a static batch dimension fixes the size and pads the last batch."""
        sizes = {i.dims[0] for i in self.inputs if i.dims and i.dims[0] is not None}
        static = bool(sizes)
        if static:
            batch_size = sizes.pop()
        # with per-task data, take an equal share of max_samples from each task
        share = None
        if max_samples is not None and self.per_task:
            share = max(1, max_samples // len(self.task_names))
        total = 0
        for idx, _, shards in self.sources:
            taken = 0
            for path in shards:
                with _open_npz(path) as files:
                    arrays = {n: files[k] for n, k in self._keys(path, files).items()}
                n = next(iter(arrays.values())).shape[0]
                for start in range(0, n, batch_size):
                    stop = min(n, start + batch_size)
                    limit = share if share is not None else max_samples
                    used = taken if share is not None else total
                    if limit is not None:
                        stop = min(stop, start + max(0, limit - used))
                    if stop <= start:
                        break
                    rows = stop - start
                    feeds = {}
                    for spec in self.inputs:
                        a = np.asarray(arrays[spec.name][start:stop]).astype(spec.dtype, copy=False)
                        if static and rows < batch_size:
                            pad = np.zeros((batch_size - rows,) + a.shape[1:], dtype=a.dtype)
                            a = np.concatenate([a, pad])
                        feeds[spec.name] = a
                    valid = np.zeros(len(next(iter(feeds.values()))), dtype=bool)
                    valid[:rows] = True
                    yield Batch(feeds, valid, np.full(len(valid), idx))
                    taken += rows
                    total += rows


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"


def open_data(spec, inputs: list[InputSpec], tasks: list[str] | None = None) -> DataSet:
    """Open calibration data.

    Args:
        spec: a path (one mixed set), or a dict ``{task: path}`` (one set per task), or a
            list of ``"task=path"`` / ``"path"`` strings as the CLI receives them.
        inputs: the model's inputs.
        tasks: the task names, in model order, used to check per-task keys.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = [str(spec)]
    if isinstance(spec, dict):
        items = [(k, v) for k, v in spec.items()]
    else:
        items = []
        for s in spec:
            s = str(s)
            if "=" in s and not Path(s).exists():
                k, v = s.split("=", 1)
                items.append((k, v))
            else:
                items.append((None, s))
    named = [k for k, _ in items if k is not None]
    if named and len(named) != len(items):
        raise CalibrationDataError("mix of per-task data (task=path) and unlabeled data; use one form")
    if named and tasks is not None:
        unknown = [k for k in named if k not in tasks]
        if unknown:
            raise CalibrationDataError(f"data for unknown task(s) {unknown}; the tasks are {tasks} (set them with --tasks)")
        items = sorted(items, key=lambda kv: tasks.index(kv[0]))
    if not items:
        raise CalibrationDataError("no calibration data given; pass --data calib.npz (or --data a=a.npz --data b=b.npz)")
    return DataSet([(k, Path(v)) for k, v in items], inputs)
