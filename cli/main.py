"""onnxzip CLI: each command parses options, makes one library call and prints a summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Zip ONNX models of the same architecture, trained on different tasks, into one multi-task model (ZipIt!).",
)
out = Console()
err = Console(stderr=True)
_state = {"verbose": False}


def _fail(e: BaseException) -> None:
    from onnxzip.errors import OnnxZipError

    if _state["verbose"]:
        raise e
    if isinstance(e, OnnxZipError):
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if isinstance(e, KeyboardInterrupt):
        err.print("interrupted; no output written")
        raise typer.Exit(130)
    err.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (run with --verbose for the traceback and report it)",
              highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _run(fn):
    try:
        return fn()
    except typer.Exit:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure gets one line, the traceback with --verbose
        _fail(e)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    _state["verbose"] = verbose


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


def _parse_params(method: str, alpha: Optional[float], beta: Optional[float], param: List[str]) -> dict:
    from onnxzip.errors import OptionError
    from onnxzip.match import get_matcher

    matcher = get_matcher(method)
    names = {p.name for p in matcher.params}
    params = {}
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is not None:
            if name not in names:
                raise OptionError(f"method '{matcher.name}' takes no parameter '{name}' (it takes: {', '.join(sorted(names)) or 'none'})")
            params[name] = value
    for p in param:
        if "=" not in p:
            raise OptionError(f"--param {p!r}: write it as name=value")
        k, v = p.split("=", 1)
        params[k.strip()] = v.strip()
    return params


def _parse_tasks_eval(items: List[str]) -> dict:
    """``a=test_a.npz`` (repeatable) or ``a=x.npz,b=y.npz``."""
    from onnxzip.errors import OptionError

    tasks = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part:
                raise OptionError(f"task data {part!r}: write it as task=file.npz")
            k, v = part.split("=", 1)
            tasks[k.strip()] = v.strip()
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


def _evaluate_models(named: dict, task_files: dict, sources: Optional[tuple] = None) -> dict:
    from onnxzip.evaluate import EnsemblePredictor, ModelPredictor, evaluate_many, load_task_data

    names = list(task_files)
    predictors = {}
    if sources is not None:
        a, b = (ModelPredictor(str(p), task=t) for p, t in zip(sources, names))
        predictors["model A"] = a
        predictors["model B"] = b
        predictors["ensemble"] = EnsemblePredictor({names[0]: a, names[1]: b})
    for label, model in named.items():
        predictors[label] = ModelPredictor(model)
    first = next(iter(predictors.values()))
    data = {t: load_task_data(p, first) for t, p in task_files.items()}
    return evaluate_many(predictors, data)


@app.command("zip")
def zip_cmd(
    model_a: Path = typer.Argument(..., help="First model (.onnx)."),
    model_b: Path = typer.Argument(..., help="Second model (.onnx), same architecture."),
    data: List[str] = typer.Option(..., "--data", "-d", help="Calibration data: calib.npz (mixed) or a folder of shards; or task=file.npz once per task."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the zipped model."),
    method: str = typer.Option("zipit", help="Matching method (see `onnxzip methods`)."),
    alpha: Optional[float] = typer.Option(None, help="zipit: similarity decay of merged clusters (default 0.3)."),
    beta: Optional[float] = typer.Option(None, help="zipit: share of within-model merges (default 0.125)."),
    param: List[str] = typer.Option([], help="Other matcher parameter, name=value (repeatable)."),
    stop_at: Optional[str] = typer.Option(None, "--stop-at", help="Share the first N layers (see `inspect`); 'all' merges the final layer too. Default: all but the final layer."),
    tasks: Optional[str] = typer.Option(None, help="Task names, comma-separated (default: file stems). Outputs are named <task>/<output>."),
    repair: bool = typer.Option(True, "--repair/--no-repair", help="Correct statistics after merging (REPAIR)."),
    repair_heads: bool = typer.Option(True, "--repair-heads/--no-repair-heads", help="Also correct layers inside each task's branch."),
    batch_size: int = typer.Option(64, help="Calibration batch size."),
    max_samples: Optional[int] = typer.Option(None, help="Use at most this many calibration samples."),
    providers: Optional[str] = typer.Option(None, help="onnxruntime execution providers, comma-separated (default CPU)."),
    report: Optional[Path] = typer.Option(None, help="Write the summary as JSON here."),
    eval_: List[str] = typer.Option([], "--eval", help="Evaluate after zipping: a=test_a.npz,b=test_b.npz (labels in the npz)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Zip MODEL_A and MODEL_B into one model with a shared trunk and one head per task."""

    def run():
        from onnxzip import zip_models
        from onnxzip.cost import count_flops, count_params
        from onnxzip.providers import resolve_providers

        task_names = [t.strip() for t in tasks.split(",")] if tasks else None
        params = _parse_params(method, alpha, beta, param)
        prov = resolve_providers(providers, warn=lambda m: err.print(f"[yellow]warning:[/yellow] {m}"))
        spec = data if len(data) > 1 or "=" in data[0] else data[0]
        t0 = time.perf_counter()
        with _bars() as bars:
            result = zip_models(
                str(model_a), str(model_b), spec, output=str(output), method=method, params=params,
                stop_at=stop_at, tasks=task_names, do_repair=repair, repair_heads=repair_heads,
                batch_size=batch_size, max_samples=max_samples, providers=prov, progress=bars,
            )
        total = time.perf_counter() - t0
        summary = result.summary()
        summary["time_s"] = round(total, 3)
        cost = {}
        for label, src in (("model A", model_a), ("model B", model_b), ("zipped", output)):
            cost[label] = {"params": count_params(str(src)), "flops": count_flops(str(src)).total}
        summary["cost"] = cost
        if eval_:
            task_files = _parse_tasks_eval(eval_)
            results = _evaluate_models({"zipped": str(output)}, task_files, (model_a, model_b))
            summary["eval"] = {k: v.to_dict() for k, v in results.items()}
        if report:
            Path(report).write_text(json.dumps(summary, indent=2))
        if as_json:
            print(json.dumps(summary, indent=2))
            return
        for w in result.warnings:
            err.print(f"[yellow]warning:[/yellow] {w}")
        out.print(f"[bold]zipped[/bold] {model_a.name} + {model_b.name} -> {output}  "
                  f"({result.method} {json.dumps(result.params)}, shared layers {result.stop_at}/{result.num_layers})")
        both = {k: cost["model A"][k] + cost["model B"][k] for k in ("params", "flops")}
        table = Table(title="cost (per sample)")
        table.add_column("")
        table.add_column("params", justify="right")
        table.add_column("FLOPs", justify="right")
        for label in ("model A", "model B"):
            table.add_row(label, _fmt_count(cost[label]["params"]), _fmt_count(cost[label]["flops"]))
        table.add_row("A + B", _fmt_count(both["params"]), _fmt_count(both["flops"]))
        z = cost["zipped"]
        table.add_row("zipped", f"{_fmt_count(z['params'])} ({z['params'] / both['params']:.0%})",
                      f"{_fmt_count(z['flops'])} ({z['flops'] / both['flops']:.0%})")
        out.print(table)
        rep = result.repair
        out.print(f"outputs: {', '.join(o for outs in result.layout.outputs.values() for o in outs)}")
        out.print(f"calibration: {result.samples} samples; repair: "
                  + (f"{rep.layers} layers in {rep.passes} passes over {rep.samples} samples" if rep else "off"))
        times = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        out.print(f"time: {total:.2f}s ({times})")
        if eval_:
            out.print(_eval_table(results, "accuracy (%)"))

    _run(run)


@app.command("inspect")
def inspect_cmd(
    model: Path = typer.Argument(..., help="Model (.onnx)."),
    data: Optional[str] = typer.Option(None, "--data", help="Example data (.npz) when input shapes are symbolic."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Print a model's layer graph: weight layers, feature groups, unsupported ops."""

    def run():
        from onnxzip import inspect

        info = inspect(str(model), data)
        if as_json:
            print(json.dumps(info, indent=2))
            return
        out.print(f"[bold]{model}[/bold]: opset {info['opset']}, inputs {info['inputs']}, outputs {info['outputs']}")
        out.print(f"{info['num_layers']} layers on the main path; zip depth up to {info['max_stop_at']}")
        table = Table(title="weight layers")
        for col in ("#", "node", "op", "weight shape", "in -> out", "reads", "writes"):
            table.add_column(col)
        for l in info["layers"]:
            num = f"{l['number']}" + (" (shortcut)" if l["shortcut"] else "")
            k = "x".join(map(str, l["kernel"]))
            op = l["op_type"] + (f" {k}" if k else "") + (" depthwise" if l["kind"] == "depthwise" else "")
            table.add_row(num, l["node"], op, str(l["weight_shape"]), f"{l['in_channels']} -> {l['out_channels']}", l["input"], l["output"])
        out.print(table)
        gt = Table(title="feature groups (merge points)")
        for col in ("group", "channels", "producers", "measured at", "through"):
            gt.add_column(col)
        for g in info["groups"]:
            prod = ", ".join(g["producers"][:3]) + (" ..." if len(g["producers"]) > 3 else "")
            where = "output (averaged, not matched)" if g["output"] else f"{len(g['measured_at'])} tensor(s)"
            gt.add_row(f"g{g['group']}", str(g["channels"]), prod, where, ", ".join(g["passes_through"]))
        out.print(gt)
        if info["unsupported"]:
            for u in info["unsupported"]:
                out.print(f"[yellow]unsupported:[/yellow] {u['op_type']} '{u['node']}': {u['reason']} (zip at most {u['max_stop_at']} layers)")
        else:
            out.print("no unsupported ops")

    _run(run)


@app.command("check")
def check_cmd(
    model_a: Path = typer.Argument(...),
    model_b: Path = typer.Argument(...),
    data: Optional[str] = typer.Option(None, "--data", help="Example data (.npz) when input shapes are symbolic."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Say whether two models can be zipped; if not, the first layer where they differ."""

    def run():
        from onnxzip import check

        info = check(str(model_a), str(model_b), data)
        if as_json:
            print(json.dumps(info, indent=2))
        elif info["zippable"]:
            out.print(f"[green]zippable[/green]: {info['num_layers']} layers, zip depth up to {info['max_stop_at']}")
        else:
            out.print(f"[red]not zippable[/red]: {info['reason']}", soft_wrap=True)
        if not info["zippable"]:
            raise typer.Exit(1)

    _run(run)


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the matching methods and their parameters."""
    from onnxzip.match import list_matchers

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
    task: List[str] = typer.Option(..., "--task", "-t", help="task=test.npz (inputs plus labels), repeatable."),
    ensemble: Optional[List[Path]] = typer.Option(None, "--ensemble", help="Source models A and B (give twice): adds model A, model B and their ensemble."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Per-task, task-average and joint accuracy, the way the ZipIt! paper judges merges."""

    def run():
        from onnxzip.errors import OptionError

        task_files = _parse_tasks_eval(task)
        if ensemble and len(ensemble) != 2:
            raise OptionError("--ensemble needs two models: --ensemble a.onnx --ensemble b.onnx")
        if ensemble and len(task_files) != 2:
            raise OptionError("--ensemble needs data for two tasks (--task a=... --task b=...)")
        if not models and not ensemble:
            raise OptionError("nothing to evaluate: give a model, or --ensemble A --ensemble B")
        named = {str(m): str(m) for m in (models or [])}
        results = _evaluate_models(named, task_files, tuple(ensemble) if ensemble else None)
        if as_json:
            print(json.dumps({k: v.to_dict() for k, v in results.items()}, indent=2))
            return
        out.print(_eval_table(results, "accuracy (%)"))

    _run(run)


if __name__ == "__main__":
    app()
