"""zip_models(): the whole pipeline, the one function the CLI calls.

load -> normalize -> build layer graphs -> check they match -> collect statistics (one
lockstep pass) -> match every feature group -> merged weights, trunk and branches -> statistics
correction -> validate -> save.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxzip.data import DataSet, InputSpec, data_files, data_items, open_data
from onnxzip.errors import ArchitectureMismatchError, CalibrationDataError, OptionError
from onnxzip.graph.build import build_layer_graph, input_specs, require_depth
from onnxzip.graph.compare import first_difference
from onnxzip.graph.layergraph import LayerGraph
from onnxzip.io import check_output_path, file_sha256, load_model, save_model
from onnxzip.match import get_matcher, validate_params
from onnxzip.merge import compute_merges
from onnxzip.progress import stage
from onnxzip.normalize import align_input_layouts, check_input_layout, convert_opset, normalize, opset_of
from onnxzip.repair import REPAIR_SAMPLES, RepairReport, default_repair_samples, repair
from onnxzip.split import ZipLayout, build_zipped_model
from onnxzip.stats.collect import ROWS_PER_FEATURE, PairStats, collect_stats, make_session

__all__ = ["ZipResult", "PreparedPair", "prepare_pair", "collect_pair_stats", "zip_models", "load_layer_graph", "resolve_stop_at", "zip_prepared",
           "labeled_data", "default_tasks"]

# Below this many calibration samples the statistics of wide layers are not trustworthy.
MIN_TRUSTED_SAMPLES = 64


@dataclass
class PreparedPair:
    """Two models parsed and checked, with their statistics: what every zip candidate reuses."""

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

    def _holdout_mask(self, start: int, rows: int) -> np.ndarray:
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
                hold[:rows] = self._holdout_mask(start, rows)
                batch.valid = batch.valid & ~hold
            start += rows
            yield batch

    def holdout_batches(self):
        """The held-out rows only (as ``valid``), for scoring zip candidates without labels."""
        start = 0
        for batch in self.data.batches(self.batch_size, self.max_samples):
            rows = int(batch.valid.sum())
            hold = np.zeros(len(batch.valid), dtype=bool)
            hold[:rows] = self._holdout_mask(start, rows)
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
    return [InputSpec(n, tuple(d), t) for n, d, t in input_specs(model)]


def _example_feeds(data: DataSet, model: onnx.ModelProto) -> dict:
    batch = next(data.batches(batch_size=1, max_samples=1))
    return batch.feeds


def load_layer_graph(model, data=None) -> LayerGraph:
    """Load (path or proto), normalize and parse one model."""
    m, _, _ = _load(model, "model")
    m = normalize(m)
    feeds = None
    if data is not None:
        feeds = _example_feeds(open_data(data, _specs(m)), m)
    return build_layer_graph(m, feeds)


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
    """Load, normalize, parse and check two models; optionally collect their statistics.

    ``holdout``: share of the calibration samples kept out of the statistics and the repair, to
    score zip candidates by their fidelity to the source models (see :mod:`onnxzip.select`).
    ``input_layout``: "NCHW" or "NHWC" for every image input; by default a model whose input
    differs from model A's only by that layout gets a Transpose in front (a warning says so), and
    the calibration data comes in A's layout.
    ``all_positions``: covariances over every position of every feature map (the default, exact);
    False samples positions of large maps (at least ``ROWS_PER_FEATURE`` rows per feature, see
    :func:`onnxzip.stats.collect.collect_stats`): faster, and it costs accuracy (bench/README.md).
    ``repair_samples``: the most rows a later repair measures on (None: every row up to
    :data:`onnxzip.repair.REPAIR_SAMPLES`; 0: all); the repair targets are taken on those rows.
    ``seed``: seeds the sampled positions (the result is otherwise deterministic).
    ``classes``: {task: class-embedding matrix [C, D] or a .npy/.npz path} for models whose output
    is an embedding: their outputs are scored against it (cosine) wherever predictions are needed.
    """
    if not 0.0 <= holdout < 1.0:
        raise OptionError(f"--holdout {holdout} must be in [0, 1)")
    t0 = time.perf_counter()
    if batch_size < 1:
        raise OptionError(f"--batch-size {batch_size} must be at least 1")
    if max_samples is not None and max_samples < 1:
        raise OptionError(f"--max-samples {max_samples} must be at least 1")
    loaded = [_load(model_a, "A"), _load(model_b, "B")]
    models = [m for m, _, _ in loaded]
    sources = [s for _, s, _ in loaded]
    hashes = [h for _, _, h in loaded]
    opsets = [opset_of(m) for m in models]
    if opsets[0] != opsets[1]:
        target = max(opsets)
        models = [convert_opset(m, target, s) for m, s in zip(models, sources)]
    models, layout_notes = align_input_layouts(models, input_layout)
    models = [normalize(m) for m in models]
    if tasks is None:
        keys = [k for k, _ in data_items(data) if k is not None]
        tasks = keys if len(keys) == len(models) else default_tasks(sources)
    class_list = _class_embeddings(classes, tasks)
    specs = [_specs(m) for m in models]
    if len(specs[0]) != len(specs[1]):
        raise ArchitectureMismatchError(f"A has {len(specs[0])} inputs, B has {len(specs[1])}; the models must take the same inputs")
    if len(specs[0]) > 1 and [s.name for s in specs[0]] != [s.name for s in specs[1]]:
        raise ArchitectureMismatchError(
            f"input names differ: A {[s.name for s in specs[0]]}, B {[s.name for s in specs[1]]}; re-export with the same input names"
        )
    for sa, sb in zip(*specs):
        da = [d for d in sa.dims[1:]]
        db = [d for d in sb.dims[1:]]
        if len(da) != len(db) or any(x is not None and y is not None and x != y for x, y in zip(da, db)):
            raise ArchitectureMismatchError(
                f"input shapes differ: A '{sa.name}' {list(sa.dims)}, B '{sb.name}' {list(sb.dims)}; the models must take the same input"
            )
    dataset = open_data(data, specs[0], tasks)
    if dataset.per_task and len(dataset.task_names) != len(models):
        raise CalibrationDataError(f"got data for tasks {dataset.task_names}; give data for every task {tasks}, or one mixed set")
    feeds = _example_feeds(dataset, models[0])
    graphs = []
    for k, m in enumerate(models):
        fk = {name: feeds[specs[0][j].name] for j, name in enumerate(s.name for s in specs[k])}
        graphs.append(build_layer_graph(m, fk))
    diff = first_difference(graphs[0], graphs[1])
    if diff is not None:
        raise ArchitectureMismatchError(f"the models differ: {diff}; zip models of the same architecture")
    warnings = [f"input layout: {note}; the zipped model takes that layout" for note in layout_notes]
    n = dataset.num_samples if max_samples is None else min(max_samples, dataset.num_samples)
    if n * (1 - holdout) < 2:
        raise CalibrationDataError(
            f"only {n} calibration sample(s){' before the hold-out' if holdout else ''}: statistics need at least 2 "
            "(a few hundred for reliable merges); pass more data"
        )
    if n < MIN_TRUSTED_SAMPLES:
        warnings.append(f"only {n} calibration samples: statistics may be unreliable (use a few hundred)")
    timings = {"load_and_parse": time.perf_counter() - t0}
    pair = PreparedPair(graphs, sources, hashes, dataset, None, batch_size, max_samples, providers, timings, warnings,
                        holdout, list(tasks), class_list)
    if holdout > 0 and n * holdout < 16:
        warnings.append(f"only about {int(n * holdout)} held-out samples to score candidates: use more calibration data")
    if collect:
        collect_pair_stats(pair, progress, all_positions, repair_samples, seed)
    return pair


def collect_pair_stats(pair: PreparedPair, progress=None, all_positions: bool = True, repair_samples: int | None = None,
                       seed: int = 0) -> PreparedPair:
    """The statistics pass of a pair prepared with ``collect=False`` (see :func:`prepare_pair`)."""
    t = time.perf_counter()
    n = pair.data.num_samples if pair.max_samples is None else min(pair.max_samples, pair.data.num_samples)
    held = int(pair._holdout_mask(0, n).sum())
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


def zip_prepared(pair: PreparedPair, method: str = "zipit", params: dict | None = None, stop_at=None,
                 tasks: list[str] | None = None, do_repair: bool = True, repair_heads: bool = True,
                 progress=None, repair_samples: int | None = None) -> ZipResult:
    """One zip candidate from prepared statistics: match, rewrite, split, repair, validate.

    ``repair_samples`` can only lower the rows the repair measures on: its targets exist for the
    rows :func:`prepare_pair` was asked for (its own ``repair_samples``); ``result.repair.samples``
    says how many were used.
    """
    params = validate_params(get_matcher(method).name, dict(params or {}))
    graphs = pair.graphs
    m = graphs[0].num_layers
    depth = resolve_stop_at(stop_at, m)
    for k, g in enumerate(graphs):
        require_depth(g, depth, pair.sources[k])
    tasks = tasks or pair.tasks or default_tasks(pair.sources)
    _check_tasks(tasks, len(graphs))
    timings = {}
    t = time.perf_counter()
    merges = compute_merges(graphs[0], pair.stats, method, params, n_models=len(graphs))
    timings["matching"] = time.perf_counter() - t
    t = time.perf_counter()
    model, layout = build_zipped_model(graphs, merges, depth, tasks)
    timings["rewrite"] = time.perf_counter() - t
    report = None
    if do_repair:
        t = time.perf_counter()
        report = repair(model, layout, graphs, merges, pair.stats, pair.batches, pair.providers,
                        heads=repair_heads, progress=stage(progress, "repair", None), max_samples=repair_samples)
        timings["repair"] = time.perf_counter() - t
    warnings = list(pair.warnings)
    if report is not None and repair_samples is None and default_repair_samples(pair.stats) < min(pair.stats.samples, REPAIR_SAMPLES):
        warnings.append(f"the statistics correction measured {report.samples} of {pair.stats.samples} calibration rows "
                        "(more would not fit in memory); --repair-samples N chooses")
    t = time.perf_counter()
    _set_metadata(model, pair, method, params, depth, m, tasks)
    validate(model, pair)
    timings["validate"] = time.perf_counter() - t
    return ZipResult(model, layout, method, params, depth, m, tasks, report, timings, pair.stats.samples, warnings)


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

    from onnxzip import __version__

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
    sess = make_session(model, pair.providers)
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


def zip_models(model_a, model_b, data, output: str | os.PathLike | None = None, method: str = "zipit",
               params: dict | None = None, stop_at=None, tasks: list[str] | None = None, do_repair: bool = True,
               repair_heads: bool = True, batch_size: int = 64, max_samples: int | None = None, providers=None,
               progress=None, holdout: float | None = None, search: str = "coordinate", select_by: str = "fidelity",
               select_data: dict | None = None, min_fidelity: float | None = None, max_flops: float | None = None,
               input_layout: str | None = None, repair_samples: int | None = None, allow_no_sharing: bool = False,
               classes: dict | None = None,
               all_positions: bool = True, seed: int = 0) -> ZipResult:
    """Zip two models of the same architecture into one multi-task model.

    Args:
        model_a, model_b: paths to ONNX files (or ModelProtos).
        data: calibration data: an .npz path or folder, or {task: path} per task.
        output: where to save the zipped model (atomically); None to only return it.
        method: a registered matcher ("zipit", "permute", "average", ...).
        params: the matcher's parameters (zipit: alpha, beta); ``"auto"`` picks a value by
            fidelity on held-out calibration samples (:func:`onnxzip.select.search_alpha_beta`).
            zipit's alpha and beta are "auto" unless given (the paper's values: 0.3, 0.125).
        stop_at: layers to share: None = all but the last (one head per task), "all", n, or
            "auto" with ``min_fidelity`` or ``max_flops`` (:func:`onnxzip.select.choose_depth`; a
            zip sharing no layer only with ``allow_no_sharing``).
        tasks: task names (default: the file stems), used as output prefixes.
        do_repair: correct statistics after merging (REPAIR).
        progress: an object with ``start(stage, total)`` and ``advance(n)`` (e.g. a progress bar):
            the statistics pass, each search and the repair are stages.
        holdout: share of calibration samples held out to score candidates (default 0.2 when
            something is "auto", else 0).
        search: "coordinate" or "grid" over the paper's alpha/beta grid.
        select_by: "fidelity" (no labels) or "accuracy" (needs ``select_data``: {task: npz with labels}).
        repair_samples: calibration rows the repair measures (None: all up to
            :data:`onnxzip.repair.REPAIR_SAMPLES`, an evenly spread subset of larger sets, fewer
            when their activations would not fit :data:`onnxzip.repair.FRONTIER_BUDGET_BYTES`, with
            a warning; 0: all; N: at most N).
        all_positions: covariances over every position of every feature map (default, exact);
            False samples the positions of large maps, at least ``ROWS_PER_FEATURE`` rows per
            feature, seeded by ``seed`` (faster; it costs accuracy, see bench/README.md).
        input_layout: "NCHW" or "NHWC": the zipped model's image input layout when the two
            models differ (default: model A's).
        classes: for embedding models, {task: class embeddings [C, D] or a .npy/.npz path}: the
            outputs are scored against them (cosine) to assign calibration rows and score candidates.
    """
    from onnxzip.select import choose_depth, make_holdout, search_alpha_beta

    matcher = get_matcher(method)
    params = dict(params or {})
    if "num_models" in params and str(params["num_models"]).strip() != "2":
        raise OptionError(f"num_models={params['num_models']}: the number of models is the number of files "
                          "given (2); it is not a parameter to set")
    if matcher.name == "zipit":  # the label-free choice unless the user sets a value
        params = {"alpha": "auto", "beta": "auto", **params}
    auto = [k for k, v in params.items() if isinstance(v, str) and v.strip().lower() == "auto"]
    fixed = {k: v for k, v in params.items() if k not in auto}
    validate_params(matcher.name, fixed)
    if auto and matcher.name != "zipit":
        raise OptionError(f"'auto' parameters are searched for zipit only, not {matcher.name}")
    bad = [k for k in auto if k not in ("alpha", "beta")]
    if bad:
        raise OptionError(f"cannot search {bad} automatically: only alpha and beta")
    auto_depth = isinstance(stop_at, str) and stop_at == "auto"
    if not auto_depth and (min_fidelity is not None or max_flops is not None):
        raise OptionError("--min-fidelity and --max-flops go with --stop-at auto")
    if holdout is None:
        holdout = 0.2 if (auto or auto_depth) else 0.0
    _check_search_options(stop_at, search, select_by, select_data, min_fidelity, max_flops)
    check_input_layout(input_layout)
    if output is not None:
        check_output_path(output, [p for p in (model_a, model_b) if not isinstance(p, onnx.ModelProto)],
                          data_files(data))
    pair = prepare_pair(model_a, model_b, data, batch_size, max_samples, providers, tasks, collect=False,
                        holdout=holdout, input_layout=input_layout, classes=classes)
    if not auto_depth:  # a depth the models cannot reach is refused before the statistics pass
        depth = resolve_stop_at(stop_at, pair.graphs[0].num_layers)
        for k, g in enumerate(pair.graphs):
            require_depth(g, depth, pair.sources[k])
    collect_pair_stats(pair, progress, all_positions, repair_samples, seed)
    selection = None
    if auto or auto_depth:
        t = time.perf_counter()
        hold = make_holdout(pair)
        labeled = labeled_data(select_data, pair) if select_data else None
        selection = {"holdout_samples": hold.size, "select_by": select_by, "candidates": []}
        if auto:
            best, tried = search_alpha_beta(pair, hold, stop_at=None if auto_depth else stop_at, tasks=pair.tasks,
                                            search=search, labeled=labeled, select_by=select_by, do_repair=do_repair,
                                            repair_heads=repair_heads, fixed=fixed, progress=progress)
            params = {**fixed, **best}
            selection["alpha_beta"] = best
            selection["candidates"] += [c.to_dict() for c in tried]
            selection["reason"] = _chosen_because(best, tried, select_by, hold.size)
        if auto_depth:
            depth, tried = choose_depth(pair, hold, method, {k: v for k, v in params.items()}, tasks=pair.tasks,
                                        min_fidelity=min_fidelity, max_flops=max_flops, labeled=labeled,
                                        select_by=select_by, do_repair=do_repair, repair_heads=repair_heads,
                                        progress=progress, allow_no_sharing=allow_no_sharing)
            stop_at = depth
            selection["stop_at"] = depth
            selection["candidates"] += [c.to_dict() for c in tried]
            target = f"{select_by} >= {min_fidelity}" if min_fidelity is not None else f"FLOPs <= {max_flops} of both models"
            selection["reason"] = (selection.get("reason", "") + f"; depth {depth}: "
                                   + ("the deepest" if min_fidelity is not None else "the best") + f" with {target}").lstrip("; ")
        selection["search_seconds"] = time.perf_counter() - t
        pair.timings["search"] = selection["search_seconds"]
    result = zip_prepared(pair, method, params, stop_at, tasks, do_repair, repair_heads, progress=progress,
                          repair_samples=repair_samples)
    result.timings = {**pair.timings, **result.timings}
    result.selection = selection
    result.sources = [g.model for g in pair.graphs]  # normalized, inputs aligned to the zipped model's layout
    if output is not None:
        t = time.perf_counter()
        save_model(result.model, output)
        result.timings["save"] = time.perf_counter() - t
        result.output = str(output)
    return result


def _chosen_because(best: dict, tried: list, select_by: str, held: int) -> str:
    """Why the search chose ``best``, in words."""
    score = max(c.score for c in tried)
    what = "joint agreement with the ensemble" if select_by == "fidelity" else "joint accuracy"
    values = ", ".join(f"{k} {v}" for k, v in best.items())
    return f"{values}: the highest {what} ({score:.3f}) of {len(tried)} candidates on {held} held-out samples"


def _check_search_options(stop_at, search, select_by, select_data, min_fidelity, max_flops) -> None:
    """The options of the automatic choices, checked before any work."""
    if isinstance(stop_at, str) and stop_at not in ("all", "auto", "heads"):
        try:
            int(stop_at)
        except ValueError:
            raise OptionError(f"--stop-at {stop_at!r}: give a layer number, 'all' or 'auto'") from None
    if search not in ("coordinate", "grid"):
        raise OptionError(f"--search {search!r}: choose coordinate or grid")
    if select_by not in ("fidelity", "accuracy"):
        raise OptionError(f"--select-by {select_by!r}: choose fidelity or accuracy")
    if select_by == "accuracy" and not select_data:
        raise OptionError("--select-by accuracy needs labeled data: --task a=test_a.npz --task b=test_b.npz")
    if min_fidelity is not None and not 0.0 <= min_fidelity <= 1.0:
        raise OptionError(f"--min-fidelity {min_fidelity} must be in [0, 1] (a share of held-out samples)")
    if max_flops is not None and not max_flops > 0.0:
        raise OptionError(f"--max-flops {max_flops} must be above 0 (a share of the FLOPs of both models)")


def labeled_data(select_data: dict, pair: PreparedPair) -> dict:
    """{task: (inputs, labels)} fitted to the zipped model's inputs; ``select_data`` maps tasks to
    .npz paths or to ``(arrays, labels)`` as :func:`onnxzip.evaluate.load_task_data` reads them."""
    from onnxzip.evaluate import input_specs as session_specs
    from onnxzip.evaluate import load_task_data, open_session, prepare_feed

    unknown = [t for t in select_data if t not in pair.tasks]
    if unknown:
        raise OptionError(f"labeled data for unknown task(s) {unknown}; the tasks are {pair.tasks}")
    model = pair.graphs[0].model
    specs = session_specs(open_session(model))
    out = {}
    for t, item in select_data.items():
        arrays, labels = load_task_data(item) if isinstance(item, (str, os.PathLike)) else item
        out[t] = (prepare_feed(arrays, specs, where=f"labeled data of task '{t}'"), labels)
    return out
