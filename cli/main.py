"""onnxzip CLI: each command parses options, makes one library call and prints a summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Zip ONNX models of the same architecture, trained on different tasks, into one multi-task model (ZipIt!).",
)
out = Console()
err = Console(stderr=True)
_state = {"verbose": False, "quiet": False}


def _fail(e: BaseException) -> None:
    from onnxzip.errors import OnnxZipError

    if _state["verbose"]:
        raise e
    if isinstance(e, OnnxZipError):
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if isinstance(e, KeyboardInterrupt):
        err.print("interrupted; no output written")
        raise typer.Exit(130)
    err.print(f"[red]internal error:[/red] {type(e).__name__}: {escape(str(e))} (run with --verbose for the traceback and report it)",
              highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _run(fn):
    try:
        return fn()
    except (typer.Exit, SystemExit):  # rich exits on a closed pipe (`onnxzip inspect m.onnx | head`)
        raise
    except BaseException as e:  # noqa: BLE001 - every failure gets one line, the traceback with --verbose
        _fail(e)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    _state["verbose"] = verbose
    _state["quiet"] = quiet


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class _Bars:
    """Progress bars on stderr for the long steps; nothing when stderr is not a terminal."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def start(self, stage: str, total):
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(stage, total=total)

    def advance(self, n: int = 1):
        self.progress.advance(self.task, n)


def _bars():
    import contextlib

    return _Bars() if err.is_terminal and not _state.get("quiet") else contextlib.nullcontext(None)


def _selection_table(sel: dict, params: dict, stop_at: int) -> Table:
    """The scored candidates; the one the zip uses is marked."""
    labeled = any(c.get("accuracy") for c in sel["candidates"])
    table = Table(title=f"candidates scored on {sel['holdout_samples']} held-out samples by {sel['select_by']} "
                        f"(search {sel['search_seconds']:.1f}s); * = chosen")
    cols = ["", "alpha", "beta", "stop at", "joint agreement", "task agreement"] + (["joint acc %"] if labeled else [])
    for col in cols + ["time (s)"]:
        table.add_column(col, justify="right")
    chosen = max((k for k, c in enumerate(sel["candidates"]) if c["stop_at"] == stop_at
                  and all(params.get(n) == v for n, v in c["params"].items())), default=None)
    for k, c in enumerate(sel["candidates"]):
        p, acc = c["params"], c.get("accuracy")
        cells = ["*" if k == chosen else "", str(p.get("alpha", "-")), str(p.get("beta", "-")), str(c["stop_at"]),
                 f"{c['joint_agreement']:.3f}", " ".join(f"{t}:{v:.2f}" for t, v in c["task_agreement"].items())]
        if labeled:
            cells.append("-" if not acc else f"{100 * acc['joint']:.1f}")
        cells.append("same merges as above" if c.get("duplicate_of") is not None else f"{c['seconds']:.1f}")
        table.add_row(*cells)
    return table


def _parse_params(method: str, alpha: Optional[str], beta: Optional[str], param: List[str]) -> dict:
    from onnxzip.errors import OptionError
    from onnxzip.matchers import get_matcher

    matcher = get_matcher(method)
    names = {p.name for p in matcher.params}
    params = {}
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is not None:
            if name not in names:
                raise OptionError(f"method '{matcher.name}' takes no parameter '{name}' (it takes: {', '.join(sorted(names)) or 'none'})")
            params[name] = value.strip() if value.strip().lower() == "auto" else _number(name, value)
    for p in param:
        k, v = _key_value(p, f"--param {p!r}: write it as name=value")
        params[k] = v
    return params


def _key_value(text: str, error: str) -> tuple[str, str]:
    """``key=value`` as (key, value), stripped; an OptionError saying ``error`` without '='."""
    from onnxzip.errors import OptionError

    if "=" not in text:
        raise OptionError(error)
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _number(name: str, value: str) -> float:
    from onnxzip.errors import OptionError

    try:
        return float(value)
    except ValueError:
        raise OptionError(f"--{name} {value!r}: give a number or 'auto'") from None


def _parse_tasks_eval(items: List[str]) -> dict:
    """``a=test_a.npz`` (repeatable) or ``a=x.npz,b=y.npz``."""
    tasks = {}
    for item in items:
        for part in item.split(","):
            if part:
                k, v = _key_value(part, f"task data {part!r}: write it as task=file.npz")
                tasks[k] = v
    return tasks


def _eval_table(results: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("model")
    tasks = []
    for r in results.values():
        for t in r.per_task:
            if t not in tasks:
                tasks.append(t)
    for t in tasks:
        table.add_column(f"task {t}", justify="right")
    table.add_column("task avg", justify="right")
    table.add_column("joint", justify="right")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    for name, r in results.items():
        table.add_row(name, *[pct(r.per_task.get(t)) for t in tasks], pct(r.task_average), pct(r.joint))
    return table


def _task_names(tasks: Optional[str], models: list, *keyed: dict) -> list:
    """--tasks, else the task keys of --data, --eval or --task (when they name every model), else
    the models' file stems."""
    from onnxzip.pipeline import default_tasks

    if tasks:
        return [t.strip() for t in tasks.split(",")]
    for keys in keyed:
        if len(keys) == len(models):
            return list(keys)
    return default_tasks([str(m) for m in models])


def _task_data(files: dict, tasks: Optional[list], option: str) -> dict:
    """Read labeled data before any work: every file holds inputs and labels, for a known task."""
    from onnxzip.errors import OptionError
    from onnxzip.evaluate import load_task_data

    unknown = [t for t in files if tasks is not None and t not in tasks]
    if unknown:
        raise OptionError(f"{option} names task(s) {unknown}; the tasks are {tasks} (name them with --tasks)")
    return {t: load_task_data(path) for t, path in files.items()}


def _data_keys(spec) -> dict:
    from onnxzip.data import data_items

    return {k: v for k, v in data_items(spec) if k is not None}


def _evaluate_models(named: dict, data: dict, sources: Optional[tuple] = None, classes: Optional[dict] = None) -> dict:
    """Accuracy of each model (and with ``sources``, of both sources and their ensemble) on
    ``data`` ({task: (arrays, labels)}, as :func:`_task_data` reads it); with ``classes``
    ({task: class embeddings}) the models' outputs are embeddings scored against them."""
    from onnxzip.errors import OptionError
    from onnxzip.evaluate import EmbeddingScorer, EnsemblePredictor, ModelPredictor, evaluate_many, prepare_feed

    runs = []  # the models themselves: the first one's inputs fit the data to every model

    def scored(predictor):
        runs.append(predictor)
        return EmbeddingScorer(predictor, classes) if classes else predictor

    names = list(data)
    predictors = {}
    if sources is not None:
        members = [scored(ModelPredictor(p, task=t)) for p, t in zip(sources, names)]
        predictors.update(dict(zip(_model_labels(len(members)), members)))
        predictors["ensemble"] = EnsemblePredictor(dict(zip(names, members)))
    for label, model in named.items():
        predictor = ModelPredictor(model)
        if predictor.tasks is None and len(data) > 1 and not classes and "onnxzip.tasks" not in predictor.metadata:
            raise OptionError(
                f"{label} has one output and no task heads, so it serves one task: evaluate it with that task's "
                f"data only (--task NAME=FILE), or with its partner as --ensemble A --ensemble B")
        predictors[label] = scored(predictor)
    specs = runs[0].input_specs
    fitted = {t: (prepare_feed(x, specs, where=f"data of task '{t}'"), y) for t, (x, y) in data.items()}
    return evaluate_many(predictors, fitted)


def _data_reads(spec, **labeled: dict) -> list:
    """(what, path) of the data files a command reads: calibration data and --eval/--task files."""
    from onnxzip.data import data_files

    reads = [("calibration data", f) for f in data_files(spec)]
    return reads + [(f"--{option} data of task '{t}'", Path(p)) for option, files in labeled.items() for t, p in files.items()]


def _class_files(files: dict, tasks: Optional[list]) -> dict:
    """--classes TASK=FILE (parsed): each task's class embeddings, read before any work."""
    from onnxzip.errors import OptionError
    from onnxzip.predictions import load_class_embeddings

    unknown = [t for t in files if tasks is not None and t not in tasks]
    if unknown:
        raise OptionError(f"--classes names task(s) {unknown}; the tasks are {tasks} (name them with --tasks)")
    return {t: load_class_embeddings(p) for t, p in files.items()}


CLASSES_HELP = ("Embedding models: a task's class embeddings [classes, D] (.npy, or .npz with 'class_embeddings'); "
                "outputs are scored by cosine against them (repeatable, one per task).")


def _data_spec(data: List[str]):
    return data if len(data) > 1 or "=" in data[0] else data[0]


@app.command("zip")
def zip_cmd(
    models: List[Path] = typer.Argument(..., metavar="MODEL_A MODEL_B [MODEL ...]", help="Two or more models (.onnx) of the same architecture, one per task."),
    data: List[str] = typer.Option(..., "--data", "-d", metavar="DATA", help="Calibration data: calib.npz (mixed) or a folder of shards; or task=file.npz once per task."),
    output: Path = typer.Option(..., "--output", "-o", metavar="FILE", help="Where to write the zipped model."),
    method: str = typer.Option("zipit", help="Matching method (see `onnxzip methods`)."),
    alpha: Optional[str] = typer.Option(None, help="zipit: similarity decay of merged clusters, in [0, 1] (the paper's: 0.3). Default: auto, chosen without labels on held-out samples."),
    beta: Optional[str] = typer.Option(None, help="zipit: share of within-model merges, in [0, 1] (the paper's: 0.125). Default: auto."),
    param: List[str] = typer.Option([], metavar="NAME=VALUE", help="Other matcher parameter (repeatable)."),
    stop_at: Optional[str] = typer.Option(None, "--stop-at", help="Share the first N layers (see `inspect`); 'all' merges the final layer too; 'auto' with --min-fidelity or --max-flops. Default: all but the final layer."),
    min_fidelity: Optional[float] = typer.Option(None, help="--stop-at auto: the deepest zip whose fidelity (joint agreement with the ensemble on held-out samples) reaches this."),
    max_flops: Optional[float] = typer.Option(None, help="--stop-at auto: the best zip using at most this share of the FLOPs of running every source model."),
    allow_no_sharing: bool = typer.Option(False, "--allow-no-sharing", help="--stop-at auto may choose 0 shared layers (the models side by side)."),
    holdout: Optional[float] = typer.Option(None, help="Share of calibration samples held out to score candidates (default 0.2 with 'auto')."),
    search: str = typer.Option("coordinate", help="alpha/beta search over the paper's grid: coordinate (11 candidates) or grid (36)."),
    select_by: str = typer.Option("fidelity", help="Score candidates by fidelity (no labels) or accuracy (needs --task)."),
    task: List[str] = typer.Option([], "--task", metavar="TASK=FILE", help="Labeled data for --select-by accuracy (repeatable)."),
    input_layout: Optional[str] = typer.Option(None, help="NCHW or NHWC: the zipped model's input layout when the models differ (default: model A's)."),
    tasks: Optional[str] = typer.Option(None, help="Task names, comma-separated (default: the task keys of --data or --eval, else the file stems). Outputs are named <task>/<output>."),
    repair: bool = typer.Option(True, "--repair/--no-repair", help="Correct statistics after merging (REPAIR)."),
    repair_branches: bool = typer.Option(True, "--repair-branches/--no-repair-branches", help="Also correct (or refit) layers inside each task's branch."),
    refit: Optional[bool] = typer.Option(None, "--refit/--no-refit", help="Fit every zipped layer to the source models' outputs by least squares, in place of the statistics correction. Default: the refit, unless the correction alone agrees better with the ensemble on held-out samples."),
    refit_ridge: Optional[float] = typer.Option(None, help="--refit: one ridge strength (relative to the input variance) for every layer; default: chosen per layer on held-out rows."),
    repair_samples: Optional[int] = typer.Option(None, help="Calibration rows the repair measures (default: all up to 512, an evenly spread subset of more, fewer if they would not fit in memory; 0: all)."),
    all_positions: bool = typer.Option(True, "--all-positions/--sample-positions", help="Covariances over every position of every feature map (exact, the default), or over sampled positions of large maps, at least 128 rows per feature (faster, less accurate)."),
    seed: int = typer.Option(0, help="Seed of the sampled positions with --sample-positions."),
    batch_size: int = typer.Option(64, help="Calibration batch size."),
    max_samples: Optional[int] = typer.Option(None, help="Use at most this many calibration samples."),
    providers: Optional[str] = typer.Option(None, help="onnxruntime execution providers, comma-separated (default CPU)."),
    report: Optional[Path] = typer.Option(None, metavar="FILE", help="Write the summary as JSON here."),
    eval_: List[str] = typer.Option([], "--eval", metavar="TASK=FILE", help="Evaluate after zipping, on labeled data: a=test_a.npz,b=test_b.npz or repeated."),
    classes: List[str] = typer.Option([], "--classes", metavar="TASK=FILE", help=CLASSES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Zip two or more models into one model with a shared trunk and one head per task."""
    # Long only by its option declarations; the work is in run() and the library.

    def run():
        from onnxzip import zip_models
        from onnxzip.io import check_paths, model_reads, model_writes, save_model, write_atomic
        from onnxzip.normalize import check_input_layout
        from onnxzip.providers import resolve_providers

        t0 = time.perf_counter()
        # every option and file is checked before any work
        _check_model_count(models)
        spec = _data_spec(data)
        eval_files, select_files = _parse_tasks_eval(eval_), _parse_tasks_eval(task)
        task_names = _task_names(tasks, models, _data_keys(spec), eval_files, select_files)
        params = _parse_params(method, alpha, beta, param)
        check_input_layout(input_layout)
        class_files = _parse_tasks_eval(classes)
        reads = model_reads(list(models)) + _data_reads(spec, eval=eval_files, task=select_files, classes=class_files)
        writes = [("--output", p) for p in model_writes(output)] + ([("--report", report)] if report else [])
        check_paths(writes, reads)
        class_embeddings = _class_files(class_files, task_names) or None
        eval_data = _task_data(eval_files, task_names, "--eval")
        select_data = _task_data(select_files, task_names, "--task") or None
        prov = resolve_providers(providers, warn=lambda m: err.print(f"[yellow]warning:[/yellow] {escape(m)}"))
        with _bars() as bars:
            result = zip_models(
                [str(m) for m in models], spec, output=None, method=method, params=params,
                stop_at=stop_at, tasks=task_names, do_repair=repair, repair_branches=repair_branches,
                batch_size=batch_size, max_samples=max_samples, providers=prov, progress=bars,
                holdout=holdout, search=search, select_by=select_by, select_data=select_data,
                min_fidelity=min_fidelity, max_flops=max_flops, input_layout=input_layout,
                repair_samples=repair_samples, all_positions=all_positions, seed=seed,
                allow_no_sharing=allow_no_sharing, classes=class_embeddings, refit=refit, refit_ridge=refit_ridge,
            )
        summary = result.summary()
        t = time.perf_counter()
        summary["cost"] = _costs({**dict(zip(_model_labels(len(models)), map(str, models))), "zipped": result.model})
        result.timings["cost"] = time.perf_counter() - t
        results = None
        if eval_data:
            t = time.perf_counter()
            # the sources as zipped (normalized, input layout aligned), so the same data fits every model
            results = _evaluate_models({"zipped": result.model}, eval_data, tuple(result.sources), class_embeddings)
            summary["eval"] = {k: v.to_dict() for k, v in results.items()}
            result.timings["eval"] = time.perf_counter() - t
        t = time.perf_counter()
        save_model(result.model, output)
        result.timings["save"] = time.perf_counter() - t
        summary.update(output=str(output), time_s=round(time.perf_counter() - t0, 3),
                       timings_s={k: round(v, 4) for k, v in result.timings.items()})
        if report:
            write_atomic(report, json.dumps(summary, indent=2))
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            _print_zip(result, summary, models, output, results)

    _run(run)


def _costs(models: dict) -> dict:
    from onnxzip.cost import count_flops, count_params

    return {label: {"params": count_params(m), "flops": count_flops(m).total} for label, m in models.items()}


def _check_model_count(models: list) -> None:
    from onnxzip.errors import OptionError

    if len(models) < 2:
        raise OptionError(f"give at least 2 models, got {len(models)}")


def _model_labels(n: int) -> list[str]:
    """Table labels of the source models: "model A", "model B" for two, "model 1" .. "model N" for more."""
    from onnxzip.graph.compare import model_labels

    return [f"model {x}" for x in model_labels(n)]


def _print_zip(result, summary: dict, models: list, output: Path, results: Optional[dict]) -> None:
    for w in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}")
    if result.selection:
        out.print(_selection_table(result.selection, result.params, result.stop_at))
        out.print(f"chosen: {escape(result.selection['reason'])}", highlight=False)
    out.print(f"[bold]zipped[/bold] {escape(' + '.join(m.name for m in models))} -> {escape(str(output))}  "
              f"({result.method} {escape(json.dumps({k: v for k, v in result.params.items() if k != 'num_models'}))}, "
              f"shared layers {result.stop_at}/{result.num_layers})",
              highlight=False)
    out.print(_cost_table(summary["cost"], len(models)))
    rep = result.repair
    out.print(f"outputs: {', '.join(o for outs in result.layout.outputs.values() for o in outs)}", highlight=False)
    fit = result.refit
    if fit is not None:
        correction = f"refit: {fit.layers} layers in {fit.passes} passes over {fit.samples} samples"
    else:
        correction = "repair: " + (f"{rep.layers} layers in {rep.passes} passes over {rep.samples} samples" if rep else "off")
    out.print(f"calibration: {result.samples} samples; {correction}", highlight=False)
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    out.print(f"time: {summary['time_s']:.2f}s ({times})", highlight=False)
    if results:
        out.print(_eval_table(results, "accuracy (%)"))


def _cost_table(cost: dict, n: int) -> Table:
    labels = _model_labels(n)
    every = {k: sum(cost[label][k] for label in labels) for k in ("params", "flops")}
    table = Table(title="cost (per sample)")
    table.add_column("")
    table.add_column("params", justify="right")
    table.add_column("FLOPs", justify="right")
    for label in labels:
        table.add_row(label, _fmt_count(cost[label]["params"]), _fmt_count(cost[label]["flops"]))
    table.add_row("A + B" if n == 2 else f"all {n}", _fmt_count(every["params"]), _fmt_count(every["flops"]))
    z = cost["zipped"]
    table.add_row("zipped", f"{_fmt_count(z['params'])} ({z['params'] / every['params']:.0%})",
                  f"{_fmt_count(z['flops'])} ({z['flops'] / every['flops']:.0%})")
    return table


@app.command("sweep")
def sweep_cmd(
    models: List[Path] = typer.Argument(..., metavar="MODEL_A MODEL_B [MODEL ...]", help="Two or more models (.onnx) of the same architecture."),
    data: List[str] = typer.Option(..., "--data", "-d", metavar="DATA", help="Calibration data (as for zip)."),
    task: List[str] = typer.Option([], "--task", metavar="TASK=FILE", help="Labeled test data (repeatable): adds accuracy columns."),
    methods: str = typer.Option("zipit,permute,average", help="Methods, comma-separated."),
    depths: Optional[str] = typer.Option(None, help="Depths to try, comma-separated (default: every depth)."),
    alpha: Optional[float] = typer.Option(None, help="zipit alpha (default 0.3)."),
    beta: Optional[float] = typer.Option(None, help="zipit beta (default 0.125)."),
    tasks: Optional[str] = typer.Option(None, help="Task names, comma-separated (default: the task keys of --data or --task, else the file stems)."),
    holdout: float = typer.Option(0.2, help="Share of calibration samples held out to measure fidelity."),
    latency: bool = typer.Option(False, "--latency/--no-latency", help="Measure onnxruntime latency of each result (one thread, fastest of 30 runs)."),
    all_positions: bool = typer.Option(True, "--all-positions/--sample-positions", help="Covariances over every position (default), or sampled positions (as for zip)."),
    seed: int = typer.Option(0, help="Seed of the sampled positions with --sample-positions."),
    batch_size: int = typer.Option(64, help="Calibration batch size."),
    max_samples: Optional[int] = typer.Option(None, help="Use at most this many calibration samples."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", metavar="FILE", help="Write the rows as CSV here."),
    plot: Optional[Path] = typer.Option(None, metavar="FILE", help="Save joint accuracy (or fidelity) against relative FLOPs as an image, e.g. sweep.png (needs matplotlib: pip install 'onnxzip[plot]')."),
    classes: List[str] = typer.Option([], "--classes", metavar="TASK=FILE", help=CLASSES_HELP),
):
    """Zip at every depth with every method: cost against accuracy, one row per (method, depth)."""
    # Long only by its option declarations; the work is in run() and the library.

    def run():
        from onnxzip.errors import OptionError
        from onnxzip.io import check_paths, model_reads, write_atomic
        from onnxzip.matchers import get_matcher, validate_params
        from onnxzip.pipeline import collect_pair_stats, labeled_data, prepare_models
        from onnxzip.select import check_depths, make_holdout, sweep

        t0 = time.perf_counter()
        _check_model_count(models)
        spec = _data_spec(data)
        test_files = _parse_tasks_eval(task)
        task_names = _task_names(tasks, models, _data_keys(spec), test_files)
        try:
            depth_list = [int(d) for d in depths.split(",")] if depths else None
        except ValueError:
            raise OptionError(f"--depths {depths!r}: give layer numbers separated by commas") from None
        method_list = [get_matcher(m).name for m in methods.split(",") if m.strip()]
        params = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
        validate_params("zipit", params)
        if plot:
            _check_plot_path(plot)
        class_files = _parse_tasks_eval(classes)
        reads = model_reads(list(models)) + _data_reads(spec, task=test_files, classes=class_files)
        check_paths([(o, p) for o, p in (("--csv", csv_out), ("--plot", plot)) if p], reads)
        class_embeddings = _class_files(class_files, task_names) or None
        test_data = _task_data(test_files, task_names, "--task")
        with _bars() as bars:
            pair = prepare_models([str(m) for m in models], spec, batch_size, max_samples, tasks=task_names,
                                holdout=holdout, collect=False, classes=class_embeddings)
            check_depths(depth_list, pair.graphs[0].num_layers)
            collect_pair_stats(pair, bars, all_positions, seed=seed)
            hold = make_holdout(pair)
            labeled = labeled_data(test_data, pair) if test_data else None
            result = sweep(pair, hold, method_list, depth_list, params, pair.tasks, labeled, latency, progress=bars)
        result["total_seconds"] = time.perf_counter() - t0
        written = {}
        if csv_out:
            written["csv"] = str(write_atomic(csv_out, _csv_text(result["rows"])))
        if plot:
            written["plot"] = str(write_atomic(plot, _plot_bytes(plot, result["rows"], labeled is not None)))
        if as_json:
            print(json.dumps({**result, "written": written}, indent=2))
            return
        out.print(_sweep_table(result, " + ".join(m.name for m in models), labeled is not None, latency))
        out.print(f"params, FLOPs{' and latency' if latency else ''} relative to running every source model; statistics "
                  f"collected once ({pair.stats.samples} samples, {result['statistics_seconds']:.1f}s); whole sweep "
                  f"{result['total_seconds']:.1f}s", highlight=False)
        for kind, path in written.items():
            out.print(f"wrote {kind}: {escape(path)}", highlight=False)

    _run(run)


def _sweep_table(result: dict, title: str, labeled: bool, latency: bool) -> Table:
    table = Table(title=f"{escape(title)}: {result['num_layers']} layers; fidelity on {result['holdout_samples']} "
                        "held-out samples")
    cols = ["method", "shared", "params", "FLOPs"] + (["latency"] if latency else []) + ["fidelity"]
    cols += ["task avg %", "joint %"] if labeled else []
    for c in cols:
        table.add_column(c, justify="right")
    for r in result["rows"]:
        if "error" in r:
            table.add_row(r["method"], f"{r['stop_at']}", *["-"] * (len(cols) - 3), escape(r["error"]))
            continue
        cells = [r["method"], r["shared"] or "-", f"{r['params_rel']:.2f}", f"{r['flops_rel']:.2f}"]
        if latency:
            cells.append("-" if r["latency_rel"] is None else f"{r['latency_rel']:.2f}")
        cells.append("-" if r.get("joint_agreement") is None else f"{r['joint_agreement']:.3f}")
        if labeled:
            acc = r.get("accuracy")
            cells += ["-" if not acc else f"{100 * acc['task_average']:.1f}", "-" if not acc else f"{100 * acc['joint']:.1f}"]
        table.add_row(*cells)
    return table


def _csv_text(rows: list) -> str:
    import csv
    import io

    cols = ["kind", "method", "stop_at", "shared", "params", "params_rel", "flops", "flops_rel", "latency_ms",
            "latency_rel", "joint_agreement", "task_avg", "joint", "seconds", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        acc = r.get("accuracy") or {}
        w.writerow({**r, "task_avg": acc.get("task_average"), "joint": acc.get("joint")})
    return buf.getvalue()


def _check_plot_path(path: Path) -> None:
    """--plot: matplotlib is installed and the file name ends in a format it writes; before any work."""
    from onnxzip.errors import OptionError

    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'onnxzip[plot]' (or leave --plot out)") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise OptionError(f"--plot {path}: give a file name ending in an image format, e.g. {path.with_suffix('.png')} "
                          f"(formats: {', '.join(sorted(formats))})")


def _plot_bytes(path: Path, rows: list, labeled: bool) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(r):
        if labeled:
            return None if not r.get("accuracy") else 100 * r["accuracy"]["joint"]
        return r.get("joint_agreement")

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["kind"] == "candidate" and "error" not in r):
        pts = sorted((r["flops_rel"], y(r)) for r in rows if r["method"] == method and "error" not in r and y(r) is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for r in rows:
        if r["kind"] == "reference" and y(r) is not None:
            ax.scatter([r["flops_rel"]], [y(r)], marker="*", s=120, label=r["method"])
    ax.set_xlabel("FLOPs relative to running both models")
    ax.set_ylabel("joint accuracy (%)" if labeled else "fidelity (joint agreement with the ensemble)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower(), dpi=120)
    plt.close(fig)
    return buf.getvalue()


@app.command("inspect")
def inspect_cmd(
    model: Path = typer.Argument(..., help="Model (.onnx)."),
    data: Optional[str] = typer.Option(None, "--data", help="Example data (.npz) when input shapes are symbolic."),
    show_all: bool = typer.Option(False, "--all", help="List every layer and group, also those past the deepest zip."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Print a model's layer graph up to the first op the zip cannot pass, and how deep a zip can go."""

    def run():
        from onnxzip import inspect

        info = inspect(str(model), data)
        if as_json:
            print(json.dumps(info, indent=2))
            return
        out.print(f"[bold]{escape(str(model))}[/bold]: opset {info['opset']}, inputs {escape(str(info['inputs']))}, "
                  f"outputs {escape(str(info['outputs']))}", highlight=False)
        depth, m, limit = info["max_stop_at"], info["num_layers"], info["limited_by"]
        out.print(f"{m} layers on the main path; deepest zip --stop-at {depth}", highlight=False)
        shown = info["layers"] if show_all or limit is None else [l for l in info["layers"] if l["number"] <= depth]
        if shown:
            out.print(_layer_table(shown, info["layers"], depth if limit else None))
        else:
            out.print("no weight layer comes before the first op the zip cannot pass (--all lists every layer)")
        produced = {l["node"] for l in shown}
        groups = [g for g in info["groups"] if show_all or set(g["producers"]) & produced]
        if groups:
            out.print(_group_table(groups))
        if limit is None:
            out.print(f"every layer can be zipped: {m} layers on the main path, deepest zip --stop-at {m} (all)",
                      highlight=False)
        else:
            out.print(f"[yellow]first op the zip cannot pass:[/yellow] {limit['op_type']} '{escape(limit['node'])}': "
                      f"{escape(limit['reason'])}", highlight=False, soft_wrap=True)
            out.print(f"deepest zip: --stop-at {depth} of {m} layers" + (
                " (no layer can be shared)" if depth == 0 else
                f"; layers {depth + 1}..{m} stay separate per task" + ("" if show_all else " (--all lists them)")),
                highlight=False)
        others = {}
        for u in info["unsupported"]:
            if limit is None or u["node"] != limit["node"]:
                others.setdefault((u["op_type"], u["reason"]), []).append(u["node"])
        for (op, reason), nodes in list(others.items())[:8]:
            where = f"'{nodes[0]}'" + (f" and {len(nodes) - 1} more" if len(nodes) > 1 else "")
            out.print(f"  also unsupported: {op} {escape(where)}: {escape(reason)}", highlight=False, soft_wrap=True)
        if len(others) > 8:
            out.print(f"  ... {len(others) - 8} more kinds (--json lists every one)", highlight=False)

    _run(run)


def _layer_table(shown: list, layers: list, depth) -> Table:
    """The weight layers in ``shown``; a row marks where the deepest zip ends (``depth``, or None)."""
    table = Table(title="weight layers" + (f" (up to the deepest zip, {len(shown)} of {len(layers)})"
                                            if len(shown) < len(layers) else ""))
    for col in ("#", "node", "op", "weight shape", "in -> out", "reads", "writes"):
        table.add_column(col, overflow="fold")
    marked = False
    for l in shown:
        if depth is not None and not marked and l["number"] > depth:
            table.add_row("", "^ deepest zip", f"--stop-at {depth}", *[""] * 4, end_section=True)
            marked = True
        num = f"{l['number']}" + (" (shortcut)" if l["shortcut"] else "")
        k = "x".join(map(str, l["kernel"]))
        op = l["op_type"] + (f" {k}" if k else "") + (" depthwise" if l["kind"] == "depthwise" else "")
        table.add_row(num, l["node"], op, str(l["weight_shape"]), f"{l['in_channels']} -> {l['out_channels']}", l["input"], l["output"])
    return table


def _group_table(groups: list) -> Table:
    gt = Table(title="feature groups (merge points)")
    for col in ("group", "channels", "producers", "measured at", "through"):
        gt.add_column(col, overflow="fold")
    for g in groups:
        prod = ", ".join(g["producers"][:3]) + (" ..." if len(g["producers"]) > 3 else "")
        where = "output (averaged, not matched)" if g["output"] else (
            "token positions (averaged, not matched)" if g.get("aligned") else f"{len(g['measured_at'])} tensor(s)")
        if g["attention_heads"] > 1:
            tied = g["attention_tie"] is not None and g["attention_tie"] != g["group"]
            where += f"; {g['attention_heads']} attention heads" + (f" (tied with g{g['attention_tie']})" if tied else "")
            where += ", rotary (channels stay in place within heads)" if g.get("rotary") else ""
        if g.get("repeats"):
            where += f"; each head of g{g['repeats'][0]} meets {g['repeats'][1]} of these (grouped-query): its merge, repeated"
        gt.add_row(f"g{g['group']}", str(g["channels"]), prod, where, ", ".join(g["passes_through"]))
    return gt


@app.command("check")
def check_cmd(
    models: List[Path] = typer.Argument(..., metavar="MODEL_A MODEL_B [MODEL ...]", help="Two or more models (.onnx)."),
    data: Optional[str] = typer.Option(None, "--data", help="Example data (.npz) when input shapes are symbolic."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Say whether the models can be zipped; if not, the first layer where they differ."""

    def run():
        from onnxzip import check

        _check_model_count(models)
        info = check([str(m) for m in models], data=data)
        if as_json:
            print(json.dumps(info, indent=2))
        elif info["zippable"]:
            if info.get("limited_by"):
                out.print(f"[green]zippable[/green]: {info['num_layers']} layers, deepest zip --stop-at {info['max_stop_at']} "
                          f"(limited by {escape(info['limited_by'])})", highlight=False, soft_wrap=True)
            else:
                out.print(f"[green]zippable[/green]: {info['num_layers']} layers, every layer (deepest zip --stop-at "
                          f"{info['max_stop_at']})", highlight=False)
        else:
            out.print(f"[red]not zippable[/red]: {info['reason']}", soft_wrap=True)
        if not as_json:
            for note in info.get("notes", []):
                out.print(f"  {note}", soft_wrap=True, highlight=False, markup=False)
        if not info["zippable"]:
            raise typer.Exit(1)

    _run(run)


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the matching methods and their parameters."""
    from onnxzip.matchers import list_matchers

    ms = list_matchers()
    if as_json:
        print(json.dumps([{"name": m.name, "description": m.description, "reference": m.reference,
                           "params": [{"name": p.name, "default": p.default, "range": p.range_text, "help": p.help} for p in m.params]}
                          for m in ms], indent=2))
        return
    table = Table(title="matching methods")
    for col in ("name", "parameters", "description", "reference"):
        table.add_column(col)
    for m in ms:
        params = "; ".join(f"{p.name}={p.default} {p.range_text}" for p in m.params) or "-"
        table.add_row(m.name, params, m.description, m.reference)
    out.print(table)


@app.command("eval")
def eval_cmd(
    models: List[Path] = typer.Argument(None, help="Models to evaluate (zipped: outputs named <task>/...)."),
    task: List[str] = typer.Option(..., "--task", "-t", metavar="TASK=FILE", help="Labeled data: inputs plus labels in an .npz (repeatable)."),
    ensemble: Optional[List[Path]] = typer.Option(None, "--ensemble", help="The source models, one per task in --task order (give it once per model, at least twice): adds each model and their ensemble."),
    classes: List[str] = typer.Option([], "--classes", metavar="TASK=FILE", help=CLASSES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Per-task, task-average and joint accuracy, the way the ZipIt! paper judges merges."""

    def run():
        from onnxzip.errors import OptionError

        task_files = _parse_tasks_eval(task)
        if ensemble and len(ensemble) < 2:
            raise OptionError("--ensemble needs at least two models: --ensemble a.onnx --ensemble b.onnx")
        if ensemble and len(task_files) != len(ensemble):
            raise OptionError(f"--ensemble of {len(ensemble)} models needs data for {len(ensemble)} tasks (--task a=... --task b=...)")
        if not models and not ensemble:
            raise OptionError("nothing to evaluate: give a model, or --ensemble A --ensemble B")
        data = _task_data(task_files, None, "--task")
        class_embeddings = _class_files(_parse_tasks_eval(classes), list(task_files)) or None
        named = {str(m): str(m) for m in (models or [])}
        results = _evaluate_models(named, data, tuple(str(p) for p in ensemble) if ensemble else None, class_embeddings)
        if as_json:
            print(json.dumps({k: v.to_dict() for k, v in results.items()}, indent=2))
            return
        out.print(_eval_table(results, "accuracy (%)"))

    _run(run)


if __name__ == "__main__":
    app()
