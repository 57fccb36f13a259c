"""The stages of one zip: prepare_models() (prepare_pair() for two) loads, normalizes and parses
N >= 2 models, checks they match and collects their statistics (one lockstep pass); zip_prepared() matches every feature
group, rewrites the weights into a trunk and per-task branches, corrects the statistics and
validates the result. The searches (onnxzip.select) call these stages; onnxzip.workflow.zip_models
puts it all together.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxzip.data import DataSet, InputSpec, data_items, open_data
from onnxzip.errors import ArchitectureMismatchError, CalibrationDataError, OptionError
from onnxzip.graph.build import build_layer_graph, declared_inputs, require_depth
from onnxzip.graph.compare import first_difference, model_labels
from onnxzip.graph.layergraph import LayerGraph
from onnxzip.io import file_sha256, load_model
from onnxzip.matchers import get_matcher, validate_params
from onnxzip.merge import compute_merges
from onnxzip.progress import stage
from onnxzip.version import __version__
from onnxzip.normalize import align_input_layouts, convert_opset, normalize, opset_of
from onnxzip.refit import RefitReport
from onnxzip.refit import refit as refit_layers
from onnxzip.repair import REPAIR_SAMPLES, RepairReport, default_repair_samples, repair
from onnxzip.split import ZipLayout, build_zipped_model
from onnxzip.runtime import session, session_inputs
from onnxzip.stats.collect import ROWS_PER_FEATURE, PairStats, collect_stats

__all__ = ["ZipResult", "PreparedPair", "prepare_pair", "prepare_models", "collect_pair_stats", "load_layer_graph", "resolve_stop_at",
           "zip_prepared", "check_depth", "depth_limit", "labeled_data", "default_tasks", "validate"]

# Below this many calibration samples the statistics of wide layers are not trustworthy.
MIN_TRUSTED_SAMPLES = 64


@dataclass
class PreparedPair:
    """The models (two or more) parsed and checked, with their statistics: what every zip candidate reuses."""

    graphs: list[LayerGraph]
    sources: list[str]
    hashes: list[str]
    data: DataSet
    stats: PairStats | None
    batch_size: int
    max_samples: int | None
    providers: list[str] | None
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    holdout: float = 0.0  # share of calibration samples kept out of statistics, to score candidates
    tasks: list = field(default_factory=list)
    classes: list | None = None  # per model: class embeddings its embedding output is scored against

    def holdout_mask(self, start: int, rows: int) -> np.ndarray:
        """Which of ``rows`` valid rows, counted from ``start``, are held out (every k-th row)."""
        if self.holdout <= 0:
            return np.zeros(rows, dtype=bool)
        every = max(2, int(round(1.0 / self.holdout)))
        return (np.arange(start, start + rows) % every) == every - 1

    def batches(self):
        """Calibration batches for statistics and repair (held-out rows masked as invalid)."""
        start = 0
        for batch in self.data.batches(self.batch_size, self.max_samples):
            rows = int(batch.valid.sum())
            if self.holdout > 0:
                hold = np.zeros(len(batch.valid), dtype=bool)
                hold[:rows] = self.holdout_mask(start, rows)
                batch.valid = batch.valid & ~hold
            start += rows
            yield batch

    def holdout_batches(self):
        """The held-out rows only (as ``valid``), for scoring zip candidates without labels."""
        start = 0
        for batch in self.data.batches(self.batch_size, self.max_samples):
            rows = int(batch.valid.sum())
            hold = np.zeros(len(batch.valid), dtype=bool)
            hold[:rows] = self.holdout_mask(start, rows)
            start += rows
            if hold.any():
                batch.valid = hold
                yield batch


@dataclass
class ZipResult:
    model: onnx.ModelProto
    layout: ZipLayout
    method: str
    params: dict
    stop_at: int
    num_layers: int
    tasks: list[str]
    repair: RepairReport | None
    timings: dict
    samples: int
    warnings: list
    output: str | None = None
    selection: dict | None = None
    sources: list | None = None
    refit: RefitReport | None = None

    def summary(self) -> dict:
        return {
            "selection": self.selection,
            "output": self.output,
            "method": self.method,
            "params": self.params,
            "stop_at": self.stop_at,
            "num_layers": self.num_layers,
            "shared_layers": f"{self.stop_at}/{self.num_layers}",
            "tasks": self.tasks,
            "outputs": self.layout.outputs,
            "calibration_samples": self.samples,
            "repair": None if self.repair is None else {
                "layers": self.repair.layers, "passes": self.repair.passes, "samples": self.repair.samples,
            },
            "refit": None if self.refit is None else {
                "layers": self.refit.layers, "passes": self.refit.passes, "samples": self.refit.samples,
            },
            "unmerge_gathers": self.layout.unmerge_nodes,
            "unmerges_folded": self.layout.folded_unmerges,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }


def _load(model, label: str) -> tuple[onnx.ModelProto, str, str]:
    if isinstance(model, onnx.ModelProto):
        return model, label, "in-memory"
    return load_model(model), str(model), file_sha256(model)


def _specs(model: onnx.ModelProto) -> list[InputSpec]:
    return [InputSpec(n, tuple(d), t) for n, d, t in declared_inputs(model)]


def _example_feeds(data: DataSet, model: onnx.ModelProto) -> dict:
    batch = next(data.batches(batch_size=1, max_samples=1))
    return batch.feeds


def load_layer_graph(model, data=None) -> LayerGraph:
    """Load (path or proto), normalize and parse one model."""
    m, _, _ = _load(model, "model")
    m, notes = normalize(m)
    feeds = None
    if data is not None:
        feeds = _example_feeds(open_data(data, _specs(m)), m)
    return build_layer_graph(m, feeds, notes)


def default_tasks(sources: list[str]) -> list[str]:
    stems = []
    for s in sources:
        stem = Path(s).name
        stem = re.sub(r"(\.onnx)$", "", stem)
        stem = re.sub(r"\.(dynamo|torchscript)$", "", stem)
        stems.append(stem)
    if len(set(stems)) != len(stems) or any(not s for s in stems):
        return [chr(ord("a") + k) for k in range(len(sources))]
    return stems


def prepare_pair(model_a, model_b, data, batch_size: int = 64, max_samples: int | None = None,
                 providers=None, tasks: list[str] | None = None, collect: bool = True, progress=None,
                 holdout: float = 0.0, input_layout: str | None = None, all_positions: bool = True,
                 repair_samples: int | None = None, seed: int = 0, classes: dict | None = None) -> PreparedPair:
    """:func:`prepare_models` of two models."""
    return prepare_models([model_a, model_b], data, batch_size, max_samples, providers, tasks, collect, progress,
                          holdout, input_layout, all_positions, repair_samples, seed, classes)


def prepare_models(models, data, batch_size: int = 64, max_samples: int | None = None,
                   providers=None, tasks: list[str] | None = None, collect: bool = True, progress=None,
                   holdout: float = 0.0, input_layout: str | None = None, all_positions: bool = True,
                   repair_samples: int | None = None, seed: int = 0, classes: dict | None = None) -> PreparedPair:
    """Load, normalize, parse and check N >= 2 models (paths or protos, one per task); optionally
    collect their statistics.

    ``holdout``: share of the calibration samples kept out of the statistics and the repair, to
    score zip candidates by their fidelity to the source models (see :mod:`onnxzip.select`).
    ``input_layout``: "NCHW" or "NHWC" for every image input; by default a model whose input
    differs from the first model's only by that layout gets a Transpose in front (a warning says
    so), and the calibration data comes in the first model's layout.
    ``all_positions``: covariances over every position of every feature map (the default, exact);
    False samples positions of large maps (at least ``ROWS_PER_FEATURE`` rows per feature, see
    :func:`onnxzip.stats.collect.collect_stats`): faster, and it costs accuracy (bench/README.md).
    ``repair_samples``: the most rows a later repair measures on (None: every row up to
    :data:`onnxzip.repair.REPAIR_SAMPLES`; 0: all); the repair targets are taken on those rows.
    ``seed``: seeds the sampled positions (the result is otherwise deterministic).
    ``classes``: {task: class-embedding matrix [C, D] or a .npy/.npz path} for models whose output
    is an embedding: their outputs are scored against it (cosine) wherever predictions are needed.
    """
    _check_options(holdout, batch_size, max_samples)
    models = list(models)
    if len(models) < 2:
        raise OptionError(f"zipping needs at least 2 models, got {len(models)}")
    t0 = time.perf_counter()
    loaded = [_load(m, label) for m, label in zip(models, model_labels(len(models)))]
    sources = [s for _, s, _ in loaded]
    hashes = [h for _, _, h in loaded]
    protos, notes, layout_notes = _normalized([m for m, _, _ in loaded], sources, input_layout)
    if tasks is None:
        keys = [k for k, _ in data_items(data) if k is not None]
        tasks = keys if len(keys) == len(protos) else default_tasks(sources)
    else:
        _check_tasks(list(tasks), len(protos))
    class_list = _class_embeddings(classes, tasks)
    specs = [_specs(m) for m in protos]
    _check_inputs(specs)
    batch = static_batch([_batch_of(s) for s in specs], sources)
    released = []
    if batch is not None and any(_batch_of(s) is None for s in specs):
        protos, released = _release_batches(protos, specs, notes, open_data(data, _with_batch(specs[0], batch), tasks))
        specs = [_specs(m) for m in protos]
        batch = static_batch([_batch_of(s) for s in specs], sources)
    dataset = open_data(data, _with_batch(specs[0], batch), tasks)
    if dataset.per_task and len(dataset.task_names) != len(protos):
        raise CalibrationDataError(f"got data for tasks {dataset.task_names}; give data for every task {tasks}, or one mixed set")
    graphs = _layer_graphs(protos, specs, notes, _example_feeds(dataset, protos[0]), sources)
    warnings = [f"input layout: {note}; the zipped model takes that layout" for note in layout_notes]
    warnings += [f"batch: model {label}'s {note}; the zipped model takes any batch" for label, note, ok in released if ok]
    kept = [f"model {label}'s {note}" for label, note, ok in released if not ok]
    if kept:
        warnings.append(f"batch: {'; '.join(kept)}; statistics run on batches of {batch} and the zipped model takes "
                        f"batches of exactly {batch}")
    n = dataset.num_samples if max_samples is None else min(max_samples, dataset.num_samples)
    warnings += _sample_count_warnings(n, holdout)
    timings = {"load_and_parse": time.perf_counter() - t0}
    pair = PreparedPair(graphs, sources, hashes, dataset, None, batch_size, max_samples, providers, timings, warnings,
                        holdout, list(tasks), class_list)
    if collect:
        collect_pair_stats(pair, progress, all_positions, repair_samples, seed)
    return pair


def _check_options(holdout: float, batch_size: int, max_samples: int | None) -> None:
    if not 0.0 <= holdout < 1.0:
        raise OptionError(f"--holdout {holdout} must be in [0, 1)")
    if batch_size < 1:
        raise OptionError(f"--batch-size {batch_size} must be at least 1")
    if max_samples is not None and max_samples < 1:
        raise OptionError(f"--max-samples {max_samples} must be at least 1")


def _batch_of(specs: list[InputSpec]) -> int | None:
    """A model's static batch size (None: a dynamic batch axis)."""
    return next((s.dims[0] for s in specs if s.dims and s.dims[0]), None)


def static_batch(batches: list[int | None], sources: list[str]) -> int | None:
    """The batch size every model can be fed, given each model's static batch (None: dynamic):
    the static batch of those that have one (the dynamo exporter bakes the example batch into
    Reshape constants), None when every batch axis is dynamic. Models with a dynamic batch axis run
    at that size too."""
    fixed = {k: b for k, b in enumerate(batches) if b is not None}
    if len(set(fixed.values())) > 1:
        labels = model_labels(len(batches))
        listed = ", ".join(f"{labels[k]} ({sources[k]}) {b}" for k, b in fixed.items())
        raise ArchitectureMismatchError(
            f"the models have different static batch sizes: {listed}; re-export them with the same example batch "
            "size, or with a dynamic batch axis"
        )
    return next(iter(fixed.values()), None)


def _release_batches(protos: list, specs: list, notes: list, dataset: DataSet) -> tuple[list, list]:
    """Models with a static batch, zipped with models that take any batch: each made to take any
    batch where its graph allows it (:func:`onnxzip.batchaxis.release_static_batch`, checked on
    the first calibration batch). Returns the models and (model label, what happened, released?)
    per static model; ``notes`` gets the same."""
    from onnxzip.batchaxis import release_static_batch

    rows = next(dataset.batches(batch_size=1)).feeds
    out, said = [], []
    labels = model_labels(len(protos))
    for k, m in enumerate(protos):
        if _batch_of(specs[k]) is None:
            out.append(m)
            continue
        feeds = {name: rows[specs[0][j].name] for j, name in enumerate(s.name for s in specs[k])}
        released, note = release_static_batch(m, feeds)
        notes[k].append(note)
        said.append((labels[k], note, released is not None))
        out.append(released if released is not None else m)
    return out, said


def _with_batch(specs: list[InputSpec], batch: int | None) -> list[InputSpec]:
    """The inputs with the batch axis fixed to ``batch`` (unchanged when None)."""
    if batch is None:
        return specs
    return [InputSpec(s.name, (batch,) + tuple(s.dims[1:]), s.dtype) if s.dims else s for s in specs]


def _layer_graphs(models: list, specs: list, notes: list, feeds: dict, sources: list[str]) -> list[LayerGraph]:
    """Every model's layer graph, checked against the first model's. ``feeds``: one sample,
    padded to the static batch when a model has one; models with a dynamic batch axis see the
    sample alone."""
    graphs = []
    for k, m in enumerate(models):
        fk = {name: feeds[specs[0][j].name] for j, name in enumerate(s.name for s in specs[k])}
        if _batch_of(specs[k]) is None:
            fk = {name: v[:1] for name, v in fk.items()}
        graphs.append(build_layer_graph(m, fk, notes[k]))
    for k in range(1, len(graphs)):
        diff = first_difference(graphs[0], graphs[k])
        if diff is None:
            continue
        which = "" if len(graphs) == 2 else f" (model {k + 1}, {sources[k]}, against model 1, {sources[0]})"
        raise ArchitectureMismatchError(f"the models differ{which}: {diff}; zip models of the same architecture")
    return graphs


def _normalized(models: list[onnx.ModelProto], sources: list[str], input_layout: str | None) -> tuple[list, list, list]:
    """The models at one opset (the higher), with one input layout, normalized; what normalization
    changed in each; and what was aligned."""
    opsets = [opset_of(m) for m in models]
    if len(set(opsets)) > 1:
        models = [convert_opset(m, max(opsets), s) for m, s in zip(models, sources)]
    models, layout_notes = align_input_layouts(models, input_layout)
    normalized = [normalize(m) for m in models]
    return [m for m, _ in normalized], [n for _, n in normalized], layout_notes


def _check_inputs(specs: list[list[InputSpec]]) -> None:
    """The models take the same inputs: count, names (when several) and shapes past the batch."""
    labels = [f"model {x}" if len(specs) > 2 else x for x in model_labels(len(specs))]
    for k in range(1, len(specs)):
        _check_input_pair(specs[0], specs[k], labels[0], labels[k])


def _check_input_pair(a: list[InputSpec], b: list[InputSpec], first: str, other: str) -> None:
    if len(a) != len(b):
        raise ArchitectureMismatchError(f"{first} has {len(a)} inputs, {other} has {len(b)}; the models must take the same inputs")
    if len(a) > 1 and [s.name for s in a] != [s.name for s in b]:
        raise ArchitectureMismatchError(
            f"input names differ: {first} {[s.name for s in a]}, {other} {[s.name for s in b]}; re-export with the same input names"
        )
    for sa, sb in zip(a, b):
        da, db = list(sa.dims[1:]), list(sb.dims[1:])
        if len(da) != len(db) or any(x is not None and y is not None and x != y for x, y in zip(da, db)):
            raise ArchitectureMismatchError(
                f"input shapes differ: {first} '{sa.name}' {list(sa.dims)}, {other} '{sb.name}' {list(sb.dims)}; the models must take the same input"
            )


def _sample_count_warnings(n: int, holdout: float) -> list[str]:
    """Too few calibration samples is an error; few is a warning (and few held out to score candidates)."""
    if n * (1 - holdout) < 2:
        raise CalibrationDataError(
            f"only {n} calibration sample(s){' before the hold-out' if holdout else ''}: statistics need at least 2 "
            "(a few hundred for reliable merges); pass more data"
        )
    warnings = []
    if n < MIN_TRUSTED_SAMPLES:
        warnings.append(f"only {n} calibration samples: statistics may be unreliable (use a few hundred)")
    if holdout > 0 and n * holdout < 16:
        warnings.append(f"only about {int(n * holdout)} held-out samples to score candidates: use more calibration data")
    return warnings


def collect_pair_stats(pair: PreparedPair, progress=None, all_positions: bool = True, repair_samples: int | None = None,
                       seed: int = 0) -> PreparedPair:
    """The statistics pass of a pair prepared with ``collect=False`` (see :func:`prepare_pair`)."""
    t = time.perf_counter()
    n = pair.data.num_samples if pair.max_samples is None else min(pair.max_samples, pair.data.num_samples)
    held = int(pair.holdout_mask(0, n).sum())
    pair.stats = collect_stats(pair.graphs, pair.batches(), pair.providers, stage(progress, "statistics", n),
                               items=n - held, rows_per_feature=None if all_positions else ROWS_PER_FEATURE,
                               preact_rows=_preact_rows(repair_samples), seed=seed, classes=pair.classes)
    pair.timings["statistics"] = time.perf_counter() - t
    return pair


def _class_embeddings(classes: dict | None, tasks: list[str]) -> list | None:
    """Per model (in task order): its task's class embeddings, or None."""
    from onnxzip.predictions import load_class_embeddings

    if not classes:
        return None
    unknown = [t for t in classes if t not in tasks]
    if unknown:
        raise OptionError(f"class embeddings for unknown task(s) {unknown}; the tasks are {tasks}")
    missing = [t for t in tasks if t not in classes]
    if missing:
        raise OptionError(f"class embeddings for task(s) {missing} are missing: give them for every task, or for none")
    return [c if isinstance(c, np.ndarray) else load_class_embeddings(c) for c in (classes[t] for t in tasks)]


def _preact_rows(repair_samples: int | None) -> int | None:
    """Rows the repair targets are taken on (a later repair may measure on a power-of-two subset
    of them, see :func:`onnxzip.repair.default_repair_samples`)."""
    if repair_samples is None:
        return REPAIR_SAMPLES
    return None if repair_samples <= 0 else int(repair_samples)


def resolve_stop_at(stop_at, num_layers: int) -> int:
    """None -> all but the final layer (one head per task); "all" -> every layer."""
    if stop_at is None or stop_at == "heads":
        return max(num_layers - 1, 0)
    if isinstance(stop_at, str):
        if stop_at == "all":
            return num_layers
        try:
            stop_at = int(stop_at)
        except ValueError:
            raise OptionError(f"--stop-at {stop_at!r}: give a layer number 0..{num_layers}, 'all' or nothing") from None
    if not 0 <= stop_at <= num_layers:
        raise OptionError(f"--stop-at {stop_at} is out of range: the models have {num_layers} layers (0..{num_layers})")
    return int(stop_at)


def depth_limit(graphs: list[LayerGraph]) -> int:
    """The most layers the models can share: up to the first unsupported op, and short of heads
    whose sizes differ (tasks with different numbers of classes)."""
    limit = min(g.max_depth() for g in graphs)
    for i, layer in enumerate(graphs[0].layers):
        if any(g.layers[i].out_channels != layer.out_channels for g in graphs[1:]):
            return min(limit, i)
    return limit


def check_depth(graphs: list[LayerGraph], depth: int, sources: list[str]) -> None:
    """Refuse a depth the models cannot share (see :func:`depth_limit`)."""
    for k, g in enumerate(graphs):
        require_depth(g, depth, sources[k])
    for i in range(depth):
        sizes = [g.layers[i].out_channels for g in graphs]
        if len(set(sizes)) > 1:
            raise OptionError(f"--stop-at {depth}: layer {graphs[0].layers[i].number} ('{graphs[0].layers[i].node}') has "
                              f"{sizes} outputs in the models (heads of different sizes stay apart): share at most {i} layers")


def zip_prepared(pair: PreparedPair, method: str = "zipit", params: dict | None = None, stop_at=None,
                 tasks: list[str] | None = None, do_repair: bool = True, repair_branches: bool = True,
                 progress=None, repair_samples: int | None = None, merges=None, refit: bool = False,
                 refit_ridge: float | None = None) -> ZipResult:
    """One zip candidate from prepared statistics: match, rewrite, split, repair or refit, validate.

    ``refit``: fit every zipped layer by least squares (:func:`onnxzip.refit.refit`, ridge
    ``refit_ridge`` or chosen per layer on held-out rows) in place of the statistics correction;
    ``repair_branches`` then says whether branch layers are refitted too.

    ``merges``: the matches of ``method`` with ``params`` on this pair's statistics when the
    caller already has them (a search keys candidates by their matches), else computed here.

    ``repair_samples`` can only lower the rows the repair measures on: its targets exist for the
    rows :func:`prepare_pair` was asked for (its own ``repair_samples``); ``result.repair.samples``
    says how many were used.
    """
    params = validate_params(get_matcher(method).name, dict(params or {}))
    graphs = pair.graphs
    if "num_models" in params:  # the number of models is the number of files
        params["num_models"] = len(graphs)
    m = graphs[0].num_layers
    depth = resolve_stop_at(stop_at, m)
    check_depth(graphs, depth, pair.sources)
    tasks = tasks or pair.tasks or default_tasks(pair.sources)
    _check_tasks(tasks, len(graphs))
    timings = {}
    t = time.perf_counter()
    if merges is None:
        merges = compute_merges(graphs[0], pair.stats, method, params, n_models=len(graphs))
    timings["matching"] = time.perf_counter() - t
    t = time.perf_counter()
    model, layout = build_zipped_model(graphs, merges, depth, tasks)
    timings["rewrite"] = time.perf_counter() - t
    report = refit_report = None
    if refit:
        t = time.perf_counter()
        refit_report = refit_layers(model, layout, graphs, merges, pair.stats, pair.batches, pair.providers,
                                    branches=repair_branches, progress=stage(progress, "refit", None),
                                    max_samples=repair_samples, ridge=refit_ridge)
        timings["refit"] = time.perf_counter() - t
    elif do_repair:
        t = time.perf_counter()
        report = repair(model, layout, graphs, merges, pair.stats, pair.batches, pair.providers,
                        branches=repair_branches, progress=stage(progress, "repair", None), max_samples=repair_samples)
        timings["repair"] = time.perf_counter() - t
    warnings = list(pair.warnings)
    if report is not None and repair_samples is None and default_repair_samples(pair.stats) < min(pair.stats.samples, REPAIR_SAMPLES):
        warnings.append(f"the statistics correction measured {report.samples} of {pair.stats.samples} calibration rows "
                        "(more would not fit in memory); --repair-samples N chooses")
    t = time.perf_counter()
    _set_metadata(model, pair, method, params, depth, m, tasks)
    validate(model, pair)
    timings["validate"] = time.perf_counter() - t
    return ZipResult(model, layout, method, params, depth, m, tasks, report, timings, pair.stats.samples, warnings,
                     refit=refit_report)


def _check_tasks(tasks: list[str], n: int) -> None:
    if len(tasks) != n:
        raise OptionError(f"--tasks needs {n} names, got {len(tasks)} ({','.join(tasks)})")
    if len(set(tasks)) != n:
        raise OptionError(f"--tasks names must differ, got {','.join(tasks)}")
    for t in tasks:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", t):
            raise OptionError(f"task name {t!r} may only use letters, digits, '_', '.', '-'")


def _set_metadata(model, pair, method, params, depth, m, tasks) -> None:
    import json

    meta = {
        "onnxzip.version": __version__,
        "onnxzip.sources": json.dumps([{"path": Path(s).name, "sha256": h} for s, h in zip(pair.sources, pair.hashes)]),
        "onnxzip.method": method,
        "onnxzip.params": json.dumps(params, sort_keys=True),
        "onnxzip.stop_at": f"{depth}/{m}",
        "onnxzip.tasks": ",".join(tasks),
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.producer_name = "onnxzip"
    model.producer_version = __version__


def validate(model: onnx.ModelProto, pair: PreparedPair) -> None:
    """onnx.checker, then one calibration batch through onnxruntime: outputs must be finite."""
    from onnxzip.errors import InternalError

    from onnxzip.io import is_large

    try:
        if not is_large(model):  # a large model is checked by path when it is saved
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise InternalError(f"the zipped model fails onnx.checker: {str(e).splitlines()[0]}") from e
    sess = session(model, pair.providers, spinning=False)
    batch = next(pair.batches())
    names = [o.name for o in sess.get_outputs()]
    feeds = {}
    for i in sess.get_inputs():
        static = isinstance(i.shape[0], int) if i.shape else True
        feeds[i.name] = batch.feeds[i.name] if static else batch.feeds[i.name][:8]  # a few rows suffice
    outs = sess.run(names, feeds)
    for n, o in zip(names, outs):
        if np.issubdtype(o.dtype, np.floating) and not np.isfinite(o).all():
            raise InternalError(f"the zipped model's output '{n}' is not finite on calibration data")


def labeled_data(select_data: dict, pair: PreparedPair) -> dict:
    """{task: (inputs, labels)} fitted to the zipped model's inputs; ``select_data`` maps tasks to
    .npz paths or to ``(arrays, labels)`` as :func:`onnxzip.evaluate.load_task_data` reads them."""
    from onnxzip.evaluate import load_task_data, prepare_feed

    unknown = [t for t in select_data if t not in pair.tasks]
    if unknown:
        raise OptionError(f"labeled data for unknown task(s) {unknown}; the tasks are {pair.tasks}")
    model = pair.graphs[0].model
    specs = session_inputs(session(model))
    out = {}
    for t, item in select_data.items():
        arrays, labels = load_task_data(item) if isinstance(item, (str, os.PathLike)) else item
        out[t] = (prepare_feed(arrays, specs, where=f"labeled data of task '{t}'"), labels)
    return out
