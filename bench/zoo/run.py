"""The zoo: inspect, check, self-zip and pair zip on tiny models from torchvision, timm and transformers.

    python bench/zoo/run.py                      # everything (~ a few minutes on 2 cores once exported)
    python bench/zoo/run.py --only tv_vit --exporter dynamo

Exports run first, in a subprocess (``export.py``: the only part that needs torch), into a cache
folder (``bench/zoo/out/``, git-ignored; delete a model's folder to re-export it). Then each model x
exporter is one case, run in a forked process with a time limit, through onnxzip alone (the CLI's
``inspect`` and ``check`` in-process, ``onnxzip.zip_models`` for the zips, onnxruntime for the
outputs); a case that fails or runs out of time fills its row with what went wrong and the table
goes on. The whole zoo writes ``bench/results/zoo.md`` (``--only``/``--exporter`` runs only print).
Column meanings: bench/README.md, section "The zoo".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

EXPORTERS = ("torchscript", "dynamo")
# a row per exporter, and "mixed": the TorchScript export of seed 0 zipped with the dynamo export of
# seed 1 (dynamic batch with static batch); its self-zip pairs the TorchScript export with the
# dynamo export of the same weights
ROWS = EXPORTERS + ("mixed",)
SAMPLES = 32  # calibration rows per task
BATCH = 8  # the export batch (static in dynamo exports)
TOKENS, VOCAB = 16, 64
SELF_PARAMS = {"alpha": 0.3, "beta": 0.0}  # beta 0: no within-model merges, a self-zip should be exact
PAIR_PARAMS = {"alpha": 0.3, "beta": 0.125}  # the paper's defaults


def _model_list() -> list[dict]:
    """Name, library, family and input kind of every zoo model, read from models.py without torch."""
    import ast

    tree = ast.parse((HERE / "models.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ZooModel":
            args = [a.value for a in node.args[:4] if isinstance(a, ast.Constant)]
            if len(args) == 4:
                mask = any(k.arg == "takes_mask" and getattr(k.value, "value", False) for k in node.keywords)
                found.append({"name": args[0], "library": args[1], "family": args[2], "kind": args[3], "mask": mask})
    return found


def write_data(folder: Path, kind: str, mask: bool) -> dict:
    """Calibration data per task: images normal(0, 1), or token ids with a right-padded attention mask."""
    paths = {}
    for k, task in enumerate(("a", "b")):
        path = folder / f"calib_{task}.npz"
        paths[task] = str(path)
        if path.exists():
            with np.load(path) as old:
                if all(len(v) == SAMPLES for v in old.values()):
                    continue
        rng = np.random.default_rng(100 + k)
        if kind == "image":
            arrays = {"input": rng.standard_normal((SAMPLES, 3, 32, 32)).astype(np.float32)}
        else:
            arrays = {"input_ids": rng.integers(0, VOCAB, (SAMPLES, TOKENS), dtype=np.int64)}
            if mask:
                lengths = rng.integers(TOKENS // 2, TOKENS + 1, SAMPLES)
                arrays["attention_mask"] = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
        np.savez(path, **arrays)
    return paths


def _one_line(e: BaseException | str) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _run_outputs(model, data: str) -> dict:
    """Every output of a model (path or proto) on every row of an .npz, in batches of BATCH."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    arrays = dict(np.load(data))
    names = [i.name for i in sess.get_inputs()]
    rows = len(next(iter(arrays.values())))
    outs: dict = {}
    for s in range(0, rows, BATCH):
        feeds = {n: arrays[n][s:s + BATCH] for n in names}
        for o, v in zip(sess.get_outputs(), sess.run(None, feeds)):
            outs.setdefault(o.name, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def _cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, args, catch_exceptions=True)
    text = res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        text += f"\n{type(res.exception).__name__}: {res.exception}"
        return 2, text
    return res.exit_code, text


def _error_line(text: str) -> str:
    lines = [l for l in text.splitlines() if "error" in l.lower()] or text.strip().splitlines()[-1:]
    return _one_line(lines[0] if lines else "no output")


def case(a: str, b: str, data: dict, send, twin: str | None = None) -> None:
    """Every stage of one model x exporter; each stage's result is sent as soon as it is known.
    ``twin``: the model the self-zip pairs with ``a`` (default ``a`` itself; the same weights from
    the other exporter for a mixed row)."""
    from onnxzip import check, inspect, zip_models
    from onnxzip.cost import count_params

    # inspect: the CLI must print without crashing; the library gives the numbers
    code, text = _cli(["inspect", a, "--data", data["a"]])
    row = {"inspect": "ok" if code == 0 else f"exit {code}: {_error_line(text)}"}
    try:
        info = inspect(a, data["a"])
        row.update(layers=info["num_layers"], inspect_depth=info["max_stop_at"])
        first = info["limited_by"]
        if first is not None:
            row["limited_by"] = f"{first['op_type']} '{first['node']}': {first['reason']}"
            if code == 0 and f"{first['op_type']} '{first['node']}'" not in " ".join(text.split()):
                row["inspect"] = "ok, but the limiting op is not named"
    except Exception as e:  # noqa: BLE001
        row["inspect"] = f"library: {_one_line(e)}"
    send(row)
    layers = row.get("layers")

    code, text = _cli(["check", a, b, "--data", data["a"]])
    row = {"check": "ok" if code in (0, 1) and "internal error" not in text else f"exit {code}: {_error_line(text)}"}
    try:
        info = check(a, b, data["a"])
        row.update(check_depth=info.get("max_stop_at"), zippable=info["zippable"])
        if not info["zippable"]:
            reason = info["reason"] or ""
            row["check"] = ("not zippable (depth 0)" if reason.startswith("no layer can be shared")
                            else f"not zippable: {_one_line(reason)}")
    except Exception as e:  # noqa: BLE001
        row["check"] = f"library: {_one_line(e)}"
    send(row)

    depth = row.get("check_depth")
    if depth is None:
        return
    if layers is None:
        from onnxzip.pipeline import load_layer_graph

        layers = load_layer_graph(a, data["a"]).num_layers
    stop_at = min(depth, layers - 1)  # the paper's full zip of a classifier: all but the final layer
    send({"stop_at": stop_at})
    if stop_at < 1:
        send({"self_off": "no layer to share", "self_on": "no layer to share", "pair": "no layer to share"})
        return

    reference = _run_outputs(a, data["a"])
    for key, repair in (("self_off", False), ("self_on", True)):
        try:
            res = zip_models(a, twin or a, data["a"], method="zipit", params=dict(SELF_PARAMS), stop_at=stop_at,
                             do_repair=repair, refit=False, tasks=["x", "y"])
            got = _run_outputs(res.model, data["a"])
            worst = 0.0
            for name, ref in reference.items():
                scale = float(np.max(np.abs(ref))) or 1.0
                for task in ("x", "y"):
                    worst = max(worst, float(np.max(np.abs(got[f"{task}/{name}"] - ref))) / scale)
            send({key: worst})
        except Exception as e:  # noqa: BLE001
            send({key: f"failed: {_one_line(e)}"})

    try:
        t = time.perf_counter()
        res = zip_models(a, b, dict(data), method="zipit", params=dict(PAIR_PARAMS), stop_at=stop_at, refit=False,
                         tasks=["a", "b"])
        seconds = time.perf_counter() - t
        agree = {}
        for task, src in (("a", a), ("b", b)):
            ref = _run_outputs(src, data[task])
            got = _run_outputs(res.model, data[task])
            name = next(iter(ref))
            agree[task] = float(np.mean(np.argmax(got[f"{task}/{name}"], -1) == np.argmax(ref[name], -1)))
        both = count_params(a) + count_params(b)
        dim = res.model.graph.input[0].type.tensor_type.shape.dim[0]
        batch = dim.dim_value if dim.HasField("dim_value") else "any"
        send({"pair": "ok" if twin is None else f"ok, batch {batch}", "pair_seconds": seconds, "pair_agree": agree,
              "pair_params": count_params(res.model) / both})
    except Exception as e:  # noqa: BLE001
        send({"pair": f"failed: {_one_line(e)}"})


def _child(a, b, data, log, conn, twin=None) -> None:
    import os

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # onnxruntime's own log lines (shape probes that
    os.dup2(fd, 1)  # onnxzip expects to fail) and anything printed go to the case's log, not the table
    os.dup2(fd, 2)
    try:
        case(a, b, data, conn.send, twin)
    except BaseException as e:  # noqa: BLE001
        conn.send({"error": _one_line(e), "traceback": traceback.format_exc()})
    finally:
        conn.send(None)
        conn.close()


def run_case(a: str, b: str, data: dict, log: Path, limit: float, twin: str | None = None) -> dict:
    """One case in a forked process; what it sent before a crash or the time limit is kept."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(a, b, data, str(log), send, twin), daemon=True)  # dies with the table
    t = time.perf_counter()
    proc.start()
    send.close()
    row: dict = {}
    done = False
    while not done:
        left = limit - (time.perf_counter() - t)
        if left <= 0:
            row["error"] = f"time limit ({limit:.0f} s) reached"
            proc.kill()
            break
        if recv.poll(min(left, 1.0)):
            try:
                msg = recv.recv()
            except EOFError:
                row.setdefault("error", f"the case process died (exit code {proc.exitcode})")
                break
            if msg is None:
                done = True
            else:
                row.update(msg)
        elif not proc.is_alive() and not recv.poll(0):
            row.setdefault("error", f"the case process died (exit code {proc.exitcode})")
            break
    proc.join(5)
    row["seconds"] = time.perf_counter() - t
    return row


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else ("-" if v is None else str(v))


COLUMNS = ["model", "exporter", "layers", "inspect", "deepest --stop-at", "limited by", "check", "zip depth",
           "self-zip err (no corr)", "self-zip err (corr)", "pair zip", "pair agree a/b", "pair params", "pair s",
           "case s"]


def table_row(name: str, exporter: str, r: dict) -> list[str]:
    if "export" in r:
        return [name, exporter, "-", r["export"]] + ["-"] * (len(COLUMNS) - 4)
    agree = r.get("pair_agree")
    check_text = r.get("check", "-")
    if check_text == "ok":
        check_text = f"zippable, depth {r.get('check_depth')}"
    pair = r.get("pair", "-")
    if "error" in r:  # the stage it stopped in shows the error
        for key in ("inspect", "check", "self_off", "self_on", "pair"):
            if key not in r:
                r[key] = r["error"]
                break
        pair = r.get("pair", "-")
        check_text = r.get("check", check_text) if check_text == "-" else check_text
    return [
        name, exporter, _num(r.get("layers"), "d"), r.get("inspect", "-"), _num(r.get("inspect_depth"), "d"),
        r.get("limited_by", "-"), check_text, _num(r.get("stop_at"), "d"),
        _num(r.get("self_off"), ".1e"), _num(r.get("self_on"), ".1e"), pair,
        "-" if not agree else f"{agree['a']:.2f} / {agree['b']:.2f}",
        _num(r.get("pair_params"), ".2f"), _num(r.get("pair_seconds"), ".1f"), _num(r.get("seconds"), ".1f"),
    ]


def markdown(rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="a model name (repeatable)")
    ap.add_argument("--exporter", choices=ROWS, help="one exporter only (mixed: TorchScript seed 0 with dynamo seed 1)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="cache folder for exports and data")
    ap.add_argument("--time-limit", type=int, default=120, help="seconds per case (model x exporter), and per export")
    ap.add_argument("--skip-export", action="store_true", help="use what the cache holds; export nothing")
    ap.add_argument("--json", type=Path, help="also write every case's raw results here")
    args = ap.parse_args()

    zoo = [m for m in _model_list() if not args.only or m["name"] in args.only]
    unknown = set(args.only) - {m["name"] for m in zoo}
    if unknown:
        sys.exit(f"unknown model(s) {sorted(unknown)}; the zoo has: {', '.join(m['name'] for m in _model_list())}")
    exporters = [args.exporter] if args.exporter else list(ROWS)
    to_export = list(EXPORTERS) if "mixed" in exporters else exporters
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_export:
        cmd = [sys.executable, str(HERE / "export.py"), "--out", str(args.out), "--time-limit", str(args.time_limit)]
        cmd += [x for m in zoo for x in ("--only", m["name"])] + [x for e in to_export for x in ("--exporter", e)]
        with open(args.out / "export.log", "w") as log:
            try:  # each export has its own limit (export.py); this one only guards against a hang
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False,
                               timeout=120 + 4 * len(zoo) * len(to_export) * args.time_limit)
            except subprocess.TimeoutExpired:
                print("the export step ran out of time; models not exported are marked so", file=sys.stderr)
    export_s = time.perf_counter() - t0

    import cli.main  # noqa: F401  (imported once, before the forks)
    import onnxzip  # noqa: F401

    rows, raw = [], {}
    for m in zoo:
        folder = args.out / m["name"]
        folder.mkdir(exist_ok=True)
        data = write_data(folder, m["kind"], m["mask"])
        for exporter in exporters:
            failed = None
            for e in (EXPORTERS if exporter == "mixed" else (exporter,)):
                status_file = folder / f"{e}.json"
                status = json.loads(status_file.read_text()) if status_file.exists() else {
                    "status": "export failed", "error": "not exported (see export.log)"}
                if status["status"] != "ok":
                    failed = failed or f"{e} export failed: {status.get('error', '')}"
            if failed:
                r = {"export": failed if exporter == "mixed" else failed.split(" ", 1)[1]}
            elif exporter == "mixed":
                paths = [str(folder / f) for f in ("torchscript-0.onnx", "dynamo-1.onnx", "dynamo-0.onnx")]
                r = run_case(paths[0], paths[1], data, folder / "mixed.log", args.time_limit, twin=paths[2])
            else:
                paths = [str(folder / f"{exporter}-{s}.onnx") for s in (0, 1)]
                r = run_case(paths[0], paths[1], data, folder / f"{exporter}.log", args.time_limit)
            raw[f"{m['name']}/{exporter}"] = r
            rows.append(table_row(m["name"], exporter, r))
            print(" | ".join(rows[-1]), flush=True)
    total = time.perf_counter() - t0
    text = markdown(rows)
    print()
    print(text)
    print(f"\n{len(rows)} cases in {total:.0f} s (exports {export_s:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if not args.only and not args.exporter:
        families = "\n".join(f"- `{m['name']}` ({m['library']}): {m['family']}" for m in zoo)
        (ROOT / "bench" / "results" / "zoo.md").write_text(
            "# The zoo: `python bench/zoo/run.py`\n\n"
            "Tiny instances (random weights) of the families people export, from the real libraries; columns "
            "explained in bench/README.md, section \"The zoo\".\n\n"
            f"{families}\n\n{text}\n\n{len(rows)} cases in {total:.0f} s on a shared 2-core machine "
            f"(exports {export_s:.0f} s, cached after the first run).\n")
        print(f"wrote {ROOT / 'bench' / 'results' / 'zoo.md'}")


if __name__ == "__main__":
    main()
