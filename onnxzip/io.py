"""Reading and writing ONNX files: the only module that touches model files on disk.

Loading checks what can go wrong with a file from elsewhere (missing, not ONNX, truncated,
external data missing or pointing outside the model's folder) and raises
:class:`~onnxzip.errors.ModelLoadError` with a one-line message. Saving is atomic: the model
(and its external data) is written under temporary names in the destination folder, checked,
and only then renamed into place, so an interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxzip.errors import ModelLoadError, OutputPathError

__all__ = [
    "load_model", "save_model", "file_sha256", "check_output_path", "check_paths", "model_files", "model_reads", "model_writes",
    "same_file", "write_atomic", "EXTERNAL_DATA_THRESHOLD", "is_large", "session_source",
]

# Protobuf cannot serialize messages over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (external data not included)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _external_locations(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, location) of every initializer stored as external data."""
    found = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            found.append((t.name, info.get("location", "")))
    return found


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data.

    Raises:
        ModelLoadError: the file is missing, not ONNX, corrupt, or its external data is
            missing or lies outside the model's folder.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a folder, not an ONNX file; pass the .onnx file inside it")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot be read ({e.strerror}); check its permissions") from e
    if not data:
        raise ModelLoadError(f"{p}: the file is empty; re-export or re-download the model")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"{p}: not a readable ONNX model (truncated or corrupt protobuf: {e}); "
            "re-export or re-download it"
        ) from e
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(
            f"{p}: does not look like an ONNX model (no graph nodes or no opset); "
            "pass the .onnx file written by your exporter"
        )
    base = p.resolve().parent
    for name, location in _external_locations(model):
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or base not in target.parents:
            raise ModelLoadError(
                f"{p}: initializer '{name}' points to external data '{location}' outside the "
                "model's folder; refusing to read it (move the data next to the model)"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{p}: external data file '{location}' for initializer '{name}' is missing; "
                f"copy it next to the model (expected at {target})"
            )
    if _external_locations(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"{p}: external data could not be read ({e}); the .data file may be truncated"
            ) from e
    return model


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a model at ``path`` is read from: the .onnx file and its external data files.

    A file that cannot be parsed is returned alone (loading it later says what is wrong)."""
    p = Path(path)
    files = [p]
    if not p.is_file():
        return files
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - load_model reports the problem with its own message
        return files
    for _, location in _external_locations(model):
        if location:
            files.append(p.parent / location)
    return files


def model_reads(models: list[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(what, path) of every file the models are read from, for :func:`check_paths`."""
    reads = []
    for k, src in enumerate(models):
        name = f"model {chr(ord('A') + k)}" if len(models) > 1 else "the model"
        files = model_files(src)
        reads += [(name, files[0])] + [(f"{name}'s external data", f) for f in files[1:]]
    return reads


def model_writes(path: str | os.PathLike) -> list[Path]:
    """The files saving a model to ``path`` may write or replace: the model and ``<name>.data``."""
    p = Path(path)
    return [p, p.parent / (p.name + ".data")]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name one file: equal once resolved, or the same file through a link."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(writes: list[tuple[str, str | os.PathLike]], reads: list[tuple[str, str | os.PathLike]]) -> None:
    """Refuse, before any work, a set of outputs that would lose or mix up the user's files.

    ``writes``: (option, path) of every file the run will write (a model's external data
    included: :func:`model_writes`); ``reads``: (what, path) of every file it reads (models with
    their external data, data files). An output that is a folder, lies in a missing folder, is one of the files
    read (by resolved path or file identity: links count) or is another output raises
    :class:`OutputPathError`.
    """
    seen: list[tuple[str, Path]] = []
    for option, w in writes:
        out = Path(w)
        if out.is_dir():
            raise OutputPathError(f"{option} {out}: is a folder; give a file name such as {out / 'zipped.onnx'}")
        parent = out.resolve().parent
        if not parent.is_dir():
            raise OutputPathError(f"{option} {out}: folder {parent} does not exist; create it first")
        for what, r in reads:
            if same_file(out, r):
                same = "" if Path(r) == out else f" ({r})"
                raise OutputPathError(
                    f"{option} {out} is an input of this run, {what}{same}; writing it would destroy it: "
                    "choose another output path")
        for other_option, other in seen:
            if same_file(out, other):
                raise OutputPathError(
                    f"{option} {out} is also the path of {other_option}; give each output its own path")
        seen.append((option, out))


def check_output_path(output: str | os.PathLike, models: list[str | os.PathLike],
                      data: list[str | os.PathLike] = ()) -> Path:
    """Refuse a model output path whose folder is missing or that would overwrite a file read:
    a model (or its external data) or a data file."""
    reads = model_reads(models) + [("calibration data", d) for d in data]
    check_paths([("-o", p) for p in model_writes(output)], reads)
    return Path(output)


def write_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write a small file (a report, a table) all at once: a temporary file beside it, renamed."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".onnxzip-", suffix=out.suffix, dir=out.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write a model atomically; large models go to ``<name>.data`` beside it.

    The model is written to temporary files in the destination folder, checked with
    ``onnx.checker`` (by path, so models over 2 GB work), and renamed into place.
    """
    out = Path(path)
    folder = out.resolve().parent
    if not folder.is_dir():
        raise OutputPathError(f"{out}: folder {folder} does not exist; create it first")
    if external_data is None:
        external_data = is_large(model)
    data_name = out.name + ".data"
    tmpdir = tempfile.mkdtemp(prefix=".onnxzip-", dir=folder)
    tmp_model = Path(tmpdir) / out.name
    try:
        if external_data:
            onnx.save_model(
                model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(tmp_model))
        onnx.checker.check_model(str(tmp_model))  # by path: works above 2 GB
        if external_data and (Path(tmpdir) / data_name).exists():
            os.replace(Path(tmpdir) / data_name, folder / data_name)
        elif (folder / data_name).exists():
            # a stale data file of an earlier external-data save would confuse readers
            os.remove(folder / data_name)
        os.replace(tmp_model, out)
    finally:
        for leftover in Path(tmpdir).glob("*"):
            leftover.unlink()
        os.rmdir(tmpdir)
    return out


def _small_enough(model: onnx.ModelProto) -> bool:
    """ByteSize itself fails on protos over 2 GiB: sum the initializers' bytes first."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else 4 * len(t.float_data)
        if total > EXTERNAL_DATA_THRESHOLD:
            return False
    return total + 16 * len(model.graph.node) * 64 <= EXTERNAL_DATA_THRESHOLD


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model cannot go through one protobuf message (about 2 GB)."""
    return not _small_enough(model)


class _TempModel:
    """A model written with external data to a private temporary folder, for onnxruntime."""

    def __init__(self, model: onnx.ModelProto):
        self.dir = tempfile.mkdtemp(prefix="onnxzip-session-")
        self.path = os.path.join(self.dir, "model.onnx")
        onnx.save_model(model, self.path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        # saving moved the tensors' bytes out of the caller's proto: put them back
        onnx.external_data_helper.load_external_data_for_model(model, self.dir)

    def __del__(self):
        import shutil

        shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)


def session_source(model: onnx.ModelProto):
    """What to give ``onnxruntime.InferenceSession``: the serialized bytes, or for a model over
    the protobuf limit a path to a temporary copy with external data (kept alive by the
    returned holder). Returns (source, holder)."""
    if not is_large(model):
        return model.SerializeToString(), None
    holder = _TempModel(model)
    return holder.path, holder
