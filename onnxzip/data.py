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

__all__ = ["InputSpec", "DataSet", "Batch", "open_data", "data_items", "data_files", "LABEL_KEYS"]

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


# Bytes read at a time when scanning an array for NaN/Inf.
_SCAN_BYTES = 64 << 20


class _ArrayReader:
    """Rows of one array of an .npz, read sequentially without loading the whole array.

    Works for stored (``numpy.savez``) and deflated (``numpy.savez_compressed``) members alike:
    the member is streamed through ``zipfile``. Memory: one read at a time, whatever the array's
    size. Fortran-ordered arrays (rare) are loaded whole.
    """

    def __init__(self, path: Path, key: str):
        self.path = path
        self.key = key
        self._zip = None
        self._file = None
        self._whole = None
        self.pos = 0
        try:
            self._zip = zipfile.ZipFile(path)
            names = set(self._zip.namelist())
            member = key + ".npy" if key + ".npy" in names else key
            self._file = self._zip.open(member)
            version = np.lib.format.read_magic(self._file)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._file)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._file)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            self.close()
            raise CalibrationDataError(f"{path}: cannot read array '{key}' ({e}); save the data with numpy.savez") from e
        if dtype.hasobject:
            self.close()
            raise CalibrationDataError(f"{path}: array '{key}' holds Python objects; save numeric arrays")
        self.shape = tuple(shape)
        self.dtype = dtype
        if fortran and len(self.shape) > 1:
            self.close()
            with _open_npz(path) as files:
                self._whole = np.ascontiguousarray(files[key])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, rows: int) -> np.ndarray:
        """The next ``rows`` rows (fewer at the end)."""
        rows = max(0, min(rows, (self.shape[0] if self.shape else 1) - self.pos))
        if self._whole is not None:
            out = self._whole[self.pos:self.pos + rows]
            self.pos += rows
            return out
        out = np.empty((rows,) + self.shape[1:], dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        got = 0
        while got < len(view):
            n = self._file.readinto(view[got:])
            if not n:
                raise CalibrationDataError(f"{self.path}: array '{self.key}' is truncated; save the data again")
            got += n
        self.pos += rows
        return out

    def skip(self, rows: int) -> None:
        self.read(rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


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
            keys = self._keys(path, files)
        counts = set()
        for name, key in keys.items():
            with _ArrayReader(path, key) as arr:
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
                    if np.issubdtype(arr.dtype, np.floating):
                        row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
                        step = max(1, _SCAN_BYTES // row_bytes)
                        for _ in range(0, arr.shape[0], step):
                            if not np.isfinite(arr.read(step)).all():
                                raise CalibrationDataError(f"{path}: array '{key}' contains NaN or Inf; clean the data")
                elif arr.dtype != spec.dtype and not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                    raise CalibrationDataError(f"{path}: array '{key}' has dtype {arr.dtype}; input '{name}' needs {np.dtype(spec.dtype).name}")
                counts.add(arr.shape[0])
        if len(counts) != 1:
            raise CalibrationDataError(f"{path}: the input arrays have different numbers of samples {sorted(counts)}")
        return counts.pop()

    def batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Batch]:
        """Yield batches; a static batch dimension fixes the size and pads the last batch.

        Arrays are streamed from the .npz files batch by batch (never loaded whole), so memory
        does not grow with the size of the data."""
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
                    keys = self._keys(path, files)
                readers = {n: _ArrayReader(path, k) for n, k in keys.items()}
                try:
                    n = next(iter(readers.values())).shape[0]
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
                            a = readers[spec.name].read(rows).astype(spec.dtype, copy=False)
                            if static and rows < batch_size:
                                pad = np.zeros((batch_size - rows,) + a.shape[1:], dtype=a.dtype)
                                a = np.concatenate([a, pad])
                            feeds[spec.name] = a
                        valid = np.zeros(len(next(iter(feeds.values()))), dtype=bool)
                        valid[:rows] = True
                        yield Batch(feeds, valid, np.full(len(valid), idx))
                        taken += rows
                        total += rows
                finally:
                    for r in readers.values():
                        r.close()


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"


def data_items(spec) -> list[tuple[str | None, str]]:
    """(task or None, path) of each data set in a spec: a path, ``{task: path}``, or the CLI's
    list of ``"task=path"`` / ``"path"`` strings."""
    if isinstance(spec, (str, os.PathLike)):
        spec = [str(spec)]
    if isinstance(spec, dict):
        return [(k, str(v)) for k, v in spec.items()]
    items = []
    for s in spec:
        s = str(s)
        if "=" in s and not Path(s).exists():
            k, v = s.split("=", 1)
            items.append((k.strip(), v.strip()))
        else:
            items.append((None, s))
    return items


def data_files(spec) -> list[Path]:
    """Every file a data spec reads (the shards of a folder included); paths that do not exist
    are listed as given, for the loader to report."""
    paths = [Path(path) for _, path in data_items(spec)]
    return [f for p in paths for f in (_shards(p) if p.is_dir() else [p])]


def open_data(spec, inputs: list[InputSpec], tasks: list[str] | None = None) -> DataSet:
    """Open calibration data.

    Args:
        spec: a path (one mixed set), or a dict ``{task: path}`` (one set per task), or a
            list of ``"task=path"`` / ``"path"`` strings as the CLI receives them.
        inputs: the model's inputs.
        tasks: the task names, in model order, used to check per-task keys.
    """
    items = data_items(spec)
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
