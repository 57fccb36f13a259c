"""Evaluation of source, ensemble and zipped models: per-task and joint accuracy.

How merges are judged (``method.md``, "How it is judged"; ZipIt! paper, Sec. 5):

- **per-task accuracy**: a task's test images, argmax within that task's own head;
- **joint accuracy**: all test images of all tasks, argmax over the union of classes. With several heads,
  each head is softmaxed over its own classes, the heads are concatenated in a fixed task order and the
  argmax is taken over the concatenation; an image is right only if the argmax lands in its own task's
  head *and* on the right class. Images of a task the predictor has no head for count as wrong.
- **ensemble**: task a's head from model A, task b's head from model B (the paper's upper bound).

A model's outputs are mapped to task heads. A zipped multi-task model names its outputs
``<task>/<name>`` (``a/logits``, ``b/logits``); a plain source model has one output, which either serves
one named task (``heads={"a": "logits"}`` or ``task="a"``) or, with no mapping, serves every task as a
*shared head* (one label space for all tasks: per-task is the argmax of that output on the task's images,
joint is the pooled accuracy over all images).

Labels index the classes of the task's own head (``0 .. classes-1``); for a shared head they index the
shared output. Accuracies are fractions in ``[0, 1]``.

Every predictor goes through the same :func:`evaluate`, so model A, model B, the ensemble and zipped
models are measured by one code path (:func:`evaluate_many`).
"""

from __future__ import annotations

import abc
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import onnx

from onnxzip.errors import CalibrationDataError, ModelLoadError, OptionError
from onnxzip.predictions import embedding_scores, joint_predictions
from onnxzip.runtime import session, session_inputs

__all__ = [
    "SHARED_HEAD",
    "Predictor",
    "ModelPredictor",
    "EnsemblePredictor",
    "EmbeddingScorer",
    "EvalResult",
    "TaskData",
    "load_task_data",
    "evaluate",
    "evaluate_many",
    "prepare_feed",
]

#: Key under which a shared-head predictor returns its single output from :meth:`Predictor.predict`.
SHARED_HEAD = "*"

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]
#: One task's evaluation data: (inputs by input name, integer labels [N]).
TaskData = tuple[dict[str, np.ndarray], np.ndarray]



# --------------------------------------------------------------------------------------------------
# Sessions and feeds (shared with onnxzip.cost)
# --------------------------------------------------------------------------------------------------


def _describe(model: ModelLike) -> str:
    if isinstance(model, onnx.ModelProto):
        name = model.graph.name or "<unnamed graph>"
        return f"in-memory model '{name}'"
    return f"'{os.fspath(model)}'"


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


def _n_samples(feed: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0


# --------------------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------------------


class Predictor(abc.ABC):
    """Something that turns a dict of input arrays into logits per task head.

    Subclasses define :attr:`tasks` and :meth:`predict`.
    """

    @property
    @abc.abstractmethod
    def tasks(self) -> tuple[str, ...] | None:
        """The tasks this predictor has heads for, in its own order; ``None`` for a shared head."""

    @property
    def shared(self) -> bool:
        """True when one output serves every task (one label space)."""
        return self.tasks is None

    @abc.abstractmethod
    def predict(
        self, inputs: Mapping[str, np.ndarray], batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        """Runs the predictor.

        Args:
            inputs: input name -> array, axis 0 = samples (a single-input model accepts any name).
            batch_size: samples per run (a model with a static batch dimension uses that size).

        Returns:
            task -> logits ``[N, classes]`` for each task in :attr:`tasks`, or
            ``{SHARED_HEAD: logits}`` for a shared head.
        """


def _as_logits(arr: np.ndarray, output: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim > 2 and all(d == 1 for d in arr.shape[1:-1]):
        arr = arr.reshape(arr.shape[0], arr.shape[-1])
    if arr.ndim != 2:
        raise OptionError(
            f"output '{output}' has shape {list(arr.shape)}, expected [samples, classes]; map the "
            f"tasks to classification outputs with heads={{task: output}}"
        )
    return arr


class ModelPredictor(Predictor):
    """Runs one ONNX model with onnxruntime and maps its outputs to task heads.

    Args:
        model: path to an .onnx file (external data resolves next to it) or a loaded ModelProto.
        heads: task -> output name. Default: outputs named ``<task>/<name>`` grouped by task (a task
            with several outputs uses ``<task>/logits``); a single-output model serves all tasks as a
            shared head unless ``task`` is given.
        task: for a single-output model, the task its output serves (same as ``heads={task: output}``).
        providers: onnxruntime execution providers; default CPU.
        intra_op_threads: onnxruntime intra-op threads (``None``: onnxruntime's default).

    Raises:
        ModelLoadError: the model cannot be loaded.
        OptionError: the head mapping does not fit the model's outputs.
    """

    def __init__(
        self,
        model: ModelLike,
        heads: Mapping[str, str] | None = None,
        providers: Sequence[str] | None = None,
        *,
        task: str | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self._where = _describe(model)
        self._session = session(model, providers, threads=intra_op_threads)
        self._specs = session_inputs(self._session)
        outputs = [o.name for o in self._session.get_outputs()]
        self._heads = self._resolve_heads(outputs, heads, task)
        self._batch = self._static_batch()

    # -- construction helpers ---------------------------------------------------------------------

    def _resolve_heads(
        self, outputs: list[str], heads: Mapping[str, str] | None, task: str | None
    ) -> dict[str, str] | None:
        if heads is not None and task is not None:
            raise OptionError(
                f"{self._where}: give either heads= or task=, not both; task= is shorthand for a "
                f"single-output model"
            )
        if task is not None:
            if len(outputs) != 1:
                raise OptionError(
                    f"{self._where}: task='{task}' needs a single-output model but it has outputs "
                    f"{outputs}; pass heads={{task: output}} instead"
                )
            return {task: outputs[0]}
        if heads is not None:
            heads = dict(heads)
            if not heads:
                raise OptionError(f"{self._where}: heads= is empty; map at least one task to an output")
            for t, out in heads.items():
                if out not in outputs:
                    raise OptionError(
                        f"{self._where}: head for task '{t}' names output '{out}', which the model "
                        f"does not have; its outputs are {outputs}"
                    )
            return heads
        if len(outputs) == 1 and "/" not in outputs[0]:
            return None  # shared head
        grouped: dict[str, list[str]] = {}
        for out in outputs:
            if "/" not in out:
                raise OptionError(
                    f"{self._where}: output '{out}' is not named '<task>/<name>' (outputs: {outputs}); "
                    f"pass heads={{task: output}} to say which output serves which task"
                )
            grouped.setdefault(out.split("/", 1)[0], []).append(out)
        resolved = {}
        for t, outs in grouped.items():
            if len(outs) == 1:
                resolved[t] = outs[0]
            elif f"{t}/logits" in outs:
                resolved[t] = f"{t}/logits"
            else:
                raise OptionError(
                    f"{self._where}: task '{t}' has several outputs {outs} and none is '{t}/logits'; "
                    f"pass heads={{task: output}} to choose"
                )
        return resolved

    def _static_batch(self) -> int | None:
        sizes = {shape[0] for _, shape in self._specs.values() if shape and shape[0] is not None}
        if len(sizes) > 1:
            raise ModelLoadError(
                f"{self._where}: inputs have different static batch sizes {sorted(sizes)}; re-export "
                f"the model with one batch dimension"
            )
        return sizes.pop() if sizes else None

    # -- Predictor --------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...] | None:
        return None if self._heads is None else tuple(self._heads)

    @property
    def heads(self) -> dict[str, str] | None:
        """task -> output name, or ``None`` for a shared head."""
        return None if self._heads is None else dict(self._heads)

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata_props (a zipped model's say which tasks it serves)."""
        return dict(self._session.get_modelmeta().custom_metadata_map)

    @property
    def static_batch(self) -> int | None:
        """The model's fixed batch size, or ``None`` when the batch dimension is dynamic."""
        return self._batch

    @property
    def input_specs(self) -> dict[str, tuple[type, tuple[int | None, ...]]]:
        """Input name -> (numpy dtype, shape with ``None`` for dynamic dims)."""
        return dict(self._specs)

    def predict(
        self, inputs: Mapping[str, np.ndarray], batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        if self._heads is None:
            name = self._session.get_outputs()[0].name
            return {SHARED_HEAD: _as_logits(self.run(inputs, [name], batch_size)[name], name)}
        fetched = self.run(inputs, list(dict.fromkeys(self._heads.values())), batch_size)
        return {t: _as_logits(fetched[o], o) for t, o in self._heads.items()}

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        """Runs the model in batches and returns the named outputs, concatenated over samples.

        A model with a static batch dimension is fed exactly that many samples per run: the last
        batch is padded by repeating its last sample, and the padded rows are dropped.

        Raises:
            CalibrationDataError: the inputs do not fit the model, or there are no samples.
            OptionError: a bad batch size.
        """
        _check_batch_size(batch_size)
        feed = prepare_feed(inputs, self._specs, where=f"data for {self._where}")
        n = _n_samples(feed)
        if n == 0:
            raise CalibrationDataError(f"data for {self._where} has no samples; give at least one")
        step = self._batch or int(batch_size)
        chunks: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for start in range(0, n, step):
            batch = {k: v[start : start + step] for k, v in feed.items()}
            real = _n_samples(batch)
            if self._batch is not None and real < self._batch:
                pad = self._batch - real
                batch = {
                    k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)], axis=0)
                    for k, v in batch.items()
                }
            for name, res in zip(outputs, self._session.run(list(outputs), batch)):
                chunks[name].append(np.asarray(res)[:real])
        return {name: np.concatenate(parts, axis=0) for name, parts in chunks.items()}

    def __repr__(self) -> str:
        return f"ModelPredictor({self._where}, heads={self._heads})"


class EnsemblePredictor(Predictor):
    """Takes each task's head from its own model (the paper's ensemble upper bound).

    Args:
        members: task -> predictor serving that task, e.g. ``{"a": predictor_a, "b": predictor_b}``.
            A member with heads must have a head for its task; a shared-head member's single output
            becomes that task's head.

    Raises:
        OptionError: no members, or a member has no head for its task.
    """

    def __init__(self, members: Mapping[str, Predictor]) -> None:
        if not members:
            raise OptionError("EnsemblePredictor needs at least one task -> predictor pair")
        for t, p in members.items():
            if not isinstance(p, Predictor):
                raise OptionError(
                    f"ensemble member for task '{t}' is a {type(p).__name__}, not a Predictor; wrap "
                    f"the model in ModelPredictor"
                )
            if p.tasks is not None and t not in p.tasks:
                raise OptionError(
                    f"ensemble member for task '{t}' has heads {list(p.tasks)} but none for '{t}'; "
                    f"pass a predictor with a '{t}' head (e.g. ModelPredictor(model, task='{t}'))"
                )
        self._members = dict(members)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._members)

    @property
    def members(self) -> dict[str, Predictor]:
        return dict(self._members)

    def predict(
        self, inputs: Mapping[str, np.ndarray], batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        cache: dict[int, dict[str, np.ndarray]] = {}  # one run per distinct member
        for t, p in self._members.items():
            if id(p) not in cache:
                cache[id(p)] = p.predict(inputs, batch_size)
            res = cache[id(p)]
            out[t] = res[SHARED_HEAD] if p.tasks is None else res[t]
        return out

    def __repr__(self) -> str:
        return f"EnsemblePredictor({self._members})"


class EmbeddingScorer(Predictor):
    """An embedding model's outputs as class scores: each task's head (or the one shared output)
    scored against that task's class embeddings (cosine times the logit scale, see
    :mod:`onnxzip.predictions`).

    Args:
        predictor: the predictor whose outputs are embeddings.
        classes: task -> class embeddings ``[classes, D]``.
    """

    def __init__(self, predictor: Predictor, classes: Mapping[str, np.ndarray]) -> None:
        if not classes:
            raise OptionError("EmbeddingScorer needs class embeddings for at least one task")
        if predictor.tasks is not None:
            missing = [t for t in predictor.tasks if t not in classes]
            if missing:
                raise OptionError(f"no class embeddings for task(s) {missing}: give them for every task")
        self._inner = predictor
        self._classes = dict(classes)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._inner.tasks if self._inner.tasks is not None else tuple(self._classes)

    def predict(
        self, inputs: Mapping[str, np.ndarray], batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        out = self._inner.predict(inputs, batch_size)
        return {t: embedding_scores(out[SHARED_HEAD] if SHARED_HEAD in out else out[t], self._classes[t])
                for t in self.tasks}

    def __repr__(self) -> str:
        return f"EmbeddingScorer({self._inner!r}, tasks={list(self._classes)})"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _check_labels(labels: Any, n: int | None, where: str) -> np.ndarray:
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
    model: ModelLike | ModelPredictor | None = None,
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
        if isinstance(model, ModelPredictor):
            specs = model.input_specs
        else:
            specs = session_inputs(session(model))
        inputs = prepare_feed(arrays, specs, where=where)
        n = _n_samples(inputs)
    labels = _check_labels(labels, n, where)
    return inputs, labels


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Accuracy of one predictor on every task (fractions in [0, 1]).

    Attributes:
        per_task: task -> accuracy within its own head; ``None`` when the predictor has no head for it.
        task_average: mean of ``per_task`` over tasks with a head (``None`` if there are none).
        tasks_with_head: how many tasks ``task_average`` averages over.
        n_tasks: number of tasks evaluated.
        joint: accuracy over all images of all tasks, argmax over the union of classes.
        samples: task -> number of images.
        correct: task -> images right within the task's head (0 when it has no head).
        joint_correct: task -> images right under the joint argmax.
        shared_head: the predictor had one output serving every task.
        head_order: the order in which heads were concatenated for the joint argmax.
    """

    per_task: dict[str, float | None]
    task_average: float | None
    tasks_with_head: int
    n_tasks: int
    joint: float
    samples: dict[str, int]
    correct: dict[str, int] = field(default_factory=dict)
    joint_correct: dict[str, int] = field(default_factory=dict)
    shared_head: bool = False
    head_order: list[str] = field(default_factory=list)

    @property
    def total_samples(self) -> int:
        return int(sum(self.samples.values()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (for ``--json`` output)."""
        return {
            "per_task": dict(self.per_task),
            "task_average": self.task_average,
            "tasks_with_head": self.tasks_with_head,
            "n_tasks": self.n_tasks,
            "joint": self.joint,
            "samples": dict(self.samples),
            "total_samples": self.total_samples,
            "correct": dict(self.correct),
            "joint_correct": dict(self.joint_correct),
            "shared_head": self.shared_head,
            "head_order": list(self.head_order),
        }


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")


def _normalize_tasks(
    tasks: Mapping[str, tuple[Any, Any]],
) -> dict[str, tuple[Mapping[str, np.ndarray], np.ndarray]]:
    if not tasks:
        raise CalibrationDataError("no evaluation tasks given; pass {task: (inputs, labels)}")
    out = {}
    for t, item in tasks.items():
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise CalibrationDataError(
                f"evaluation data for task '{t}' must be a pair (inputs, labels); load it with "
                f"load_task_data"
            )
        inputs, labels = item
        if isinstance(inputs, np.ndarray):
            inputs = {"input": inputs}
        if not isinstance(inputs, Mapping) or not inputs:
            raise CalibrationDataError(
                f"evaluation inputs for task '{t}' must be a non-empty dict of arrays"
            )
        ns = {np.asarray(v).shape[0] if np.ndim(v) else None for v in inputs.values()}
        n = ns.pop() if len(ns) == 1 else None
        if n is None:
            raise CalibrationDataError(
                f"evaluation inputs for task '{t}' have differing or missing sample axes; every "
                f"array needs the same length on axis 0"
            )
        if n == 0:
            raise CalibrationDataError(f"task '{t}' has no samples; give it at least one image")
        if labels is None:
            raise CalibrationDataError(
                f"task '{t}' has no labels; evaluation needs the class of every image"
            )
        out[t] = (inputs, _check_labels(labels, n, f"task '{t}'"))
    return out


def _check_label_range(t: str, labels: np.ndarray, classes: int, head: str) -> None:
    if labels.size and labels.max() >= classes:
        raise CalibrationDataError(
            f"task '{t}': labels go up to {labels.max()} but {head} has {classes} classes; labels "
            f"must index the task's own head (0..{classes - 1})"
        )


def evaluate(
    predictor: Predictor,
    tasks: Mapping[str, TaskData],
    batch_size: int = 256,
) -> EvalResult:
    """Per-task, task-average and joint accuracy of one predictor.

    Args:
        predictor: a :class:`Predictor` (a source model, an ensemble or a zipped model).
        tasks: task -> ``(inputs, labels)``; the dict order is the task order of the joint argmax.
            Heads the predictor has for tasks not in ``tasks`` come after, in the predictor's order.
        batch_size: samples per onnxruntime run.

    Returns:
        An :class:`EvalResult`.

    Raises:
        CalibrationDataError: bad data (missing labels, sample counts, labels beyond a head's classes).
        OptionError: a bad batch size, or an output that is not ``[N, classes]``.
    """
    _check_batch_size(batch_size)
    data = _normalize_tasks(tasks)
    head_tasks = predictor.tasks
    samples = {t: int(lab.shape[0]) for t, (_, lab) in data.items()}

    if head_tasks is None:
        return _evaluate_shared(predictor, data, samples, batch_size)

    order = [t for t in data if t in head_tasks] + [t for t in head_tasks if t not in data]
    per_task: dict[str, float | None] = {}
    correct: dict[str, int] = {}
    joint_correct: dict[str, int] = {}
    for t, (inputs, labels) in data.items():
        n = samples[t]
        logits = predictor.predict(inputs, batch_size)
        if t in head_tasks:
            _check_label_range(t, labels, logits[t].shape[1], "its head")
            correct[t] = int((logits[t].argmax(axis=1) == labels).sum())
            per_task[t] = correct[t] / n
            # Joint: softmax each head over its own classes, concatenate in `order`, argmax; right
            # only when the argmax lands in this task's block and on the right class.
            offset = int(sum(logits[h].shape[1] for h in order[: order.index(t)]))
            joint_correct[t] = int((joint_predictions([logits[h] for h in order]) == labels + offset).sum())
        else:
            per_task[t] = None
            correct[t] = 0
            joint_correct[t] = 0  # no head for this task: every image counts as wrong
    return _finish(per_task, samples, correct, joint_correct, shared=False, order=order)


def _evaluate_shared(
    predictor: Predictor,
    data: Mapping[str, tuple[Mapping[str, np.ndarray], np.ndarray]],
    samples: dict[str, int],
    batch_size: int,
) -> EvalResult:
    per_task: dict[str, float | None] = {}
    correct: dict[str, int] = {}
    for t, (inputs, labels) in data.items():
        n = samples[t]
        logits = predictor.predict(inputs, batch_size)[SHARED_HEAD]
        _check_label_range(t, labels, logits.shape[1], "the shared output")
        correct[t] = int((logits.argmax(axis=1) == labels).sum())
        per_task[t] = correct[t] / n
    return _finish(per_task, samples, correct, dict(correct), shared=True, order=[])


def _finish(
    per_task: dict[str, float | None],
    samples: dict[str, int],
    correct: dict[str, int],
    joint_correct: dict[str, int],
    *,
    shared: bool,
    order: list[str],
) -> EvalResult:
    with_head = [v for v in per_task.values() if v is not None]
    total = sum(samples.values())
    return EvalResult(
        per_task=per_task,
        task_average=float(np.mean(with_head)) if with_head else None,
        tasks_with_head=len(with_head),
        n_tasks=len(per_task),
        joint=sum(joint_correct.values()) / total,
        samples=samples,
        correct=correct,
        joint_correct=joint_correct,
        shared_head=shared,
        head_order=order,
    )


def evaluate_many(
    named_predictors: Mapping[str, Predictor],
    tasks: Mapping[str, TaskData],
    batch_size: int = 256,
) -> dict[str, EvalResult]:
    """Evaluates several predictors on the same data with the same code path.

    Args:
        named_predictors: name -> predictor, e.g. ``{"model A": ..., "ensemble": ..., "zipit": ...}``.
        tasks: task -> ``(inputs, labels)``, as for :func:`evaluate`.
        batch_size: samples per onnxruntime run.

    Returns:
        name -> :class:`EvalResult`, in the order given.
    """
    return {name: evaluate(p, tasks, batch_size) for name, p in named_predictors.items()}
