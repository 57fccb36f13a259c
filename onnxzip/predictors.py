"""Predictors: a model, an ensemble of models, or an embedding model with class embeddings,
each turning input arrays into logits per task head (see :mod:`onnxzip.evaluate`)."""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import onnx

from onnxzip.errors import CalibrationDataError, ModelLoadError, OptionError
from onnxzip.predictions import embedding_scores
from onnxzip.runtime import describe_model, session, session_inputs
from onnxzip.taskdata import prepare_feed, sample_count

__all__ = ["SHARED_HEAD", "Predictor", "ModelPredictor", "EnsemblePredictor", "EmbeddingScorer", "ModelLike",
           "check_batch_size"]

#: Key under which a shared-head predictor returns its single output from :meth:`Predictor.predict`.
SHARED_HEAD = "*"

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]


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
        self._where = describe_model(model)
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
        check_batch_size(batch_size)
        feed = prepare_feed(inputs, self._specs, where=f"data for {self._where}")
        n = sample_count(feed)
        if n == 0:
            raise CalibrationDataError(f"data for {self._where} has no samples; give at least one")
        step = self._batch or int(batch_size)
        chunks: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for start in range(0, n, step):
            batch = {k: v[start : start + step] for k, v in feed.items()}
            real = sample_count(batch)
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


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
