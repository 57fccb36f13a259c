"""Predictions from model outputs: the one place that turns head outputs into class scores,
confidences (which model a row belongs to) and joint predictions, for the statistics pass, the
label-free selection and eval.

A head's output is either logits (one score per class) or, for an embedding model, a vector
scored against a class-embedding matrix: the cosine similarity with each class's embedding, times
:data:`EMBEDDING_LOGIT_SCALE` (CLIP's logit scale), so that a softmax over them is as sharp as a
trained classifier's. A language model's logits ``[rows, tokens, vocab]`` are one prediction per
token (:func:`token_rows`).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from onnxzip.errors import CalibrationDataError

__all__ = [
    "EMBEDDING_LOGIT_SCALE", "softmax", "joint_predictions", "embedding_scores", "class_scores",
    "load_class_embeddings", "owner_masks", "TIE_TOLERANCE", "is_sequence", "token_rows",
]

# Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), 2021:
# the learned logit scale is clipped at 100.
EMBEDDING_LOGIT_SCALE = 100.0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64) of ``[rows, ...]`` head outputs, flattened per row."""
    z = logits.reshape(logits.shape[0], -1).astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def joint_predictions(heads: list[np.ndarray]) -> np.ndarray:
    """Argmax over the concatenation of each head's softmax (method.md, "How it is judged")."""
    return np.concatenate([softmax(h) for h in heads], axis=1).argmax(axis=1)


def embedding_scores(embeddings: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``[rows, C]`` cosine similarities of ``[rows, D]`` embeddings with ``[C, D]`` class
    embeddings, times :data:`EMBEDDING_LOGIT_SCALE`."""
    e = embeddings.reshape(embeddings.shape[0], -1).astype(np.float64)
    if e.shape[1] != classes.shape[1]:
        raise CalibrationDataError(
            f"class embeddings have {classes.shape[1]} dimensions but the model's output has {e.shape[1]}; "
            "give one row per class in the model's embedding space")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    c = classes.astype(np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return EMBEDDING_LOGIT_SCALE * (e @ c.T)


def class_scores(output: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
    """A head's output as class scores: logits as they are, an embedding scored against ``classes``."""
    return output if classes is None else embedding_scores(output, classes)


def load_class_embeddings(path: str | os.PathLike) -> np.ndarray:
    """A ``[classes, D]`` float matrix from .npy, or from .npz (its ``class_embeddings`` array, or its only one)."""
    where = f"'{os.fspath(path)}'"
    if not os.path.isfile(path):
        raise CalibrationDataError(f"class embeddings {where} do not exist; check the path")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arr = loaded
        else:
            with loaded as npz:
                key = "class_embeddings" if "class_embeddings" in npz.files else (npz.files[0] if len(npz.files) == 1 else None)
                if key is None:
                    raise CalibrationDataError(
                        f"{where} holds {npz.files}; name the matrix 'class_embeddings' (one row per class)")
                arr = npz[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CalibrationDataError(f"cannot read class embeddings {where} ({e}); save them with numpy.save") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all() or arr.shape[0] < 1:
        raise CalibrationDataError(
            f"class embeddings {where} have shape {list(arr.shape)} and dtype {arr.dtype}; give a finite float "
            "matrix [classes, D], one row per class of the task")
    return arr


# Confidences closer than this are a tie: the sample informs both models (identical models
# then get identical targets, so correcting a model zipped with itself changes nothing).
TIE_TOLERANCE = 1e-5


def owner_masks(batch, head_outputs: list[np.ndarray], classes: list | None = None) -> np.ndarray:
    """[models, rows] bool: which model's target statistics each row informs.

    Rows labeled by task go to that task's model; unlabeled rows go to the model whose own
    head is the most confident on them (method.md), ties to all tied models. ``classes``: per
    model, the class embeddings its (embedding) output is scored against, or None for logits.
    """
    n = len(head_outputs)
    if (batch.task >= 0).all():
        return np.stack([batch.task == k for k in range(n)])
    classes = classes or [None] * n
    conf = np.stack([_softmax_confidence(class_scores(o, c)) for o, c in zip(head_outputs, classes)])
    return conf >= conf.max(axis=0, keepdims=True) - TIE_TOLERANCE


def _softmax_confidence(logits: np.ndarray) -> np.ndarray:
    if is_sequence(logits):  # a language model: the mean over tokens of each token's confidence
        rows, tokens = logits.shape[:2]
        return softmax(token_rows(logits)).max(axis=1).reshape(rows, tokens).mean(axis=1)
    return softmax(logits).max(axis=1)


def is_sequence(output: np.ndarray) -> bool:
    """A head output ``[rows, tokens, classes]`` (a language model's logits): one prediction per token."""
    return output.ndim == 3


def token_rows(output: np.ndarray) -> np.ndarray:
    """``[rows, tokens, classes]`` -> ``[rows * tokens, classes]``: every token is one prediction
    (fidelity counts agreement per token); other outputs are returned as they are."""
    return output.reshape(-1, output.shape[-1]) if is_sequence(output) else output
