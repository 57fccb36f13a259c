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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxzip.errors import CalibrationDataError
from onnxzip.predictions import joint_predictions
from onnxzip.predictors import SHARED_HEAD, EmbeddingScorer, EnsemblePredictor, ModelPredictor, Predictor, check_batch_size
from onnxzip.taskdata import TaskData, check_labels, load_task_data, prepare_feed

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
        out[t] = (inputs, check_labels(labels, n, f"task '{t}'"))
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
    check_batch_size(batch_size)
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
