"""Choosing alpha, beta and the zip depth without labels, and sweeping depths and methods.

A candidate zip is scored on calibration samples held out of the statistics by its *fidelity*
to the source models (method.md, "Choosing alpha and beta without labels"):

- joint agreement: how often the zipped model's joint prediction (softmax each head over its own
  classes, argmax over the concatenation) equals the ensemble's joint prediction;
- per-task agreement: on the samples of each task (its labels, else the samples its own source
  model is most confident on), how often that task's head agrees with its source model.

Joint agreement is the selection score; with labeled data, joint accuracy can be used instead.
Statistics are collected once; each candidate only redoes matching, rewrite and repair.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxzip.errors import OnnxZipError, OptionError
from onnxzip.graph.compare import model_labels
from onnxzip.pipeline import depth_limit, zip_prepared
from onnxzip.progress import stage
from onnxzip.predictions import class_scores, is_sequence, joint_predictions, owner_masks, token_rows
from onnxzip.runtime import session

__all__ = [
    "ALPHA_GRID", "BETA_GRID", "Holdout", "Candidate", "make_holdout", "fidelity", "search_alpha_beta",
    "choose_correction",
    "choose_depth", "sweep", "check_depths",
]

# The paper's grid (Stoica et al., ICLR 2024, appendix: hyperparameter search).
ALPHA_GRID = (1.0, 0.5, 0.3, 0.1, 0.01, 0.0001)
BETA_GRID = (1.0, 0.25, 0.125, 0.075, 0.0375, 0.0)


@dataclass
class Holdout:
    """Held-out calibration rows and what the source models say on them."""

    feeds: dict  # input name -> rows (only held-out rows)
    owner: np.ndarray  # [models, rows] bool
    source_heads: list  # per model: its head's outputs [rows, classes]
    ensemble_joint: np.ndarray  # [rows]
    labels: np.ndarray | None = None  # joint label (task offset + class) when the data is labeled
    classes: list | None = None  # per task: class embeddings its (embedding) head is scored against

    @property
    def size(self) -> int:
        return len(self.ensemble_joint)


def make_holdout(pair, limit: int = 2048) -> Holdout:
    """Collect the held-out rows of ``pair`` and the source models' predictions on them."""
    graphs = pair.graphs
    classes = pair.classes or [None] * len(graphs)
    sessions = [session(g.model, pair.providers, spinning=False) for g in graphs]
    feeds: dict[str, list] = {}
    heads: list[list] = [[] for _ in graphs]
    owners = []
    total = 0
    for batch in pair.holdout_batches():
        outs = []
        for g, sess in zip(graphs, sessions):
            f = {name: batch.feeds[graphs[0].inputs[j]] for j, name in enumerate(g.inputs)}
            outs.append(class_scores(sess.run([g.outputs[0]], f)[0], classes[len(outs)]))
        keep = batch.valid
        owners.append(owner_masks(batch, outs)[:, keep])
        for k, o in enumerate(outs):
            heads[k].append(o[keep])
        for name, v in batch.feeds.items():
            feeds.setdefault(name, []).append(v[keep])
        total += int(keep.sum())
        if total >= limit:
            break
    if total == 0:
        raise OptionError("no held-out calibration samples to score candidates: use --holdout > 0 and more data")
    source_heads = [np.concatenate(h) for h in heads]
    owner = np.concatenate(owners, axis=1)
    if is_sequence(source_heads[0]):  # a language model: each token is one prediction, owned by its row's model
        owner = np.repeat(owner, source_heads[0].shape[1], axis=1)
        source_heads = [token_rows(h) for h in source_heads]
    return Holdout(
        feeds={k: np.concatenate(v) for k, v in feeds.items()},
        owner=owner,
        source_heads=source_heads,
        ensemble_joint=joint_predictions(source_heads),
        classes=pair.classes,
    )


@dataclass
class Fidelity:
    joint: float
    per_task: dict

    def to_dict(self) -> dict:
        return {"joint_agreement": self.joint, "task_agreement": self.per_task}


def _model_heads(model: onnx.ModelProto, tasks: list[str], feeds: dict, providers, batch: int = 256,
                 classes: list | None = None) -> list[np.ndarray]:
    """Each task's head output on ``feeds``, as class scores (``classes``: see :class:`Holdout`)."""
    sess = session(model, providers, spinning=False)
    names = [o.name for o in sess.get_outputs()]
    heads = []
    for t in tasks:
        name = next((n for n in names if n.startswith(f"{t}/")), None)
        heads.append(name)
    if any(h is None for h in heads):  # fully merged: one shared output serves every task
        heads = [names[0]] * len(tasks)
    inputs = [i.name for i in sess.get_inputs()]
    static = sess.get_inputs()[0].shape[0]
    n = len(next(iter(feeds.values())))
    step = static if isinstance(static, int) and static > 0 else batch
    outs = {h: [] for h in dict.fromkeys(heads)}
    for s in range(0, n, step):
        f = {}
        for i in inputs:
            x = feeds[i][s:s + step]
            if isinstance(static, int) and static > 0 and len(x) < static:
                x = np.concatenate([x, np.repeat(x[-1:], static - len(x), axis=0)])
            f[i] = x
        rows = min(step, n - s)
        for h, v in zip(outs, sess.run(list(outs), f)):
            outs[h].append(v[:rows])
    classes = classes or [None] * len(tasks)
    return [class_scores(np.concatenate(outs[h]), c) for h, c in zip(heads, classes)]


def fidelity(model: onnx.ModelProto, holdout: Holdout, tasks: list[str], providers=None) -> Fidelity:
    """How faithfully a zipped model reproduces its sources on held-out rows."""
    heads = [token_rows(h) for h in _model_heads(model, tasks, holdout.feeds, providers, classes=holdout.classes)]
    joint = float((joint_predictions(heads) == holdout.ensemble_joint).mean())
    per_task = {}
    for k, t in enumerate(tasks):
        mask = holdout.owner[k]
        if mask.any():
            agree = heads[k][mask].argmax(axis=1) == holdout.source_heads[k][mask].argmax(axis=1)
            per_task[t] = float(agree.mean())
    return Fidelity(joint, per_task)


@dataclass
class Candidate:
    method: str
    params: dict
    stop_at: int
    score: float
    fidelity: dict
    accuracy: dict | None = None
    seconds: float = 0.0
    duplicate_of: int | None = None  # same merges as an earlier candidate: not rebuilt
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method, "params": self.params, "stop_at": self.stop_at, "score": self.score,
            **self.fidelity, "accuracy": self.accuracy, "seconds": round(self.seconds, 3),
            "duplicate_of": self.duplicate_of, **self.extra,
        }


def _merges_key(merges) -> str:
    h = hashlib.sha256()
    for gid in sorted(merges):
        h.update(np.ascontiguousarray(merges[gid].merge).tobytes())
    return h.hexdigest()


def _evaluate_candidate(pair, method, params, stop_at, tasks, holdout, labeled, do_repair, repair_branches, merges=None,
                        **zip_options):
    z = zip_prepared(pair, method, params, stop_at, tasks, do_repair, repair_branches, merges=merges, **zip_options)
    fid = fidelity(z.model, holdout, tasks, pair.providers)
    acc = None
    if labeled is not None:
        from onnxzip.evaluate import ModelPredictor

        acc = _accuracy(ModelPredictor(z.model), labeled)
    return z, fid, acc


def _accuracy(predictor, labeled) -> dict:
    from onnxzip.evaluate import evaluate

    r = evaluate(predictor, labeled)
    return {"joint": r.joint, "task_average": r.task_average, "per_task": r.per_task}


def search_alpha_beta(pair, holdout: Holdout, stop_at=None, tasks=None, alphas=None, betas=None,
                      search: str = "coordinate", labeled=None, select_by: str = "fidelity",
                      do_repair: bool = True, repair_branches: bool = True, fixed: dict | None = None, progress=None):
    """Pick zipit's alpha and beta; returns (best params, every candidate tried).

    ``search="grid"`` tries every (alpha, beta) of the grids; ``"coordinate"`` tries every beta at
    the first alpha given (or the paper's default), then every alpha at the best beta (11
    candidates instead of 36 on the paper's grid). Candidates whose matches equal an earlier
    candidate's are scored once. ``fixed`` holds a parameter the user set (not searched).
    ``progress`` (see :mod:`onnxzip.progress`) advances once per candidate.
    """
    from onnxzip.merge import compute_merges

    tasks = tasks or pair.tasks
    fixed = dict(fixed or {})
    alphas = [fixed["alpha"]] if "alpha" in fixed else list(alphas or ALPHA_GRID)
    betas = [fixed["beta"]] if "beta" in fixed else list(betas or BETA_GRID)
    if select_by == "accuracy" and labeled is None:
        raise OptionError("selecting by accuracy needs labeled data (--task a=... --task b=...)")
    tried: list[Candidate] = []
    seen: dict[str, int] = {}
    coordinate = search == "coordinate" and len(alphas) > 1 and len(betas) > 1
    if search not in ("grid", "coordinate"):
        raise OptionError(f"--search {search!r}: choose grid or coordinate")
    a0 = 0.3 if 0.3 in alphas else alphas[0]
    total = len(betas) + len([a for a in alphas if a != a0]) if coordinate else len(alphas) * len(betas)
    advance = stage(progress, "alpha, beta", total)

    def score(alpha, beta):
        params = {"alpha": alpha, "beta": beta}
        for c in tried:
            if c.params == params:
                return c
        t = time.perf_counter()
        merges = compute_merges(pair.graphs[0], pair.stats, "zipit", {**params, "num_models": len(pair.graphs)},
                                n_models=len(pair.graphs))
        key = _merges_key(merges)
        if key in seen:
            first = tried[seen[key]]
            c = Candidate("zipit", params, first.stop_at, first.score, first.fidelity, first.accuracy,
                          time.perf_counter() - t, duplicate_of=seen[key])
        else:
            z, fid, acc = _evaluate_candidate(pair, "zipit", params, stop_at, tasks, holdout, labeled, do_repair,
                                              repair_branches, merges)
            value = acc["joint"] if select_by == "accuracy" else fid.joint
            c = Candidate("zipit", params, z.stop_at, value, fid.to_dict(), acc, time.perf_counter() - t)
            seen[key] = len(tried)
        tried.append(c)
        if advance is not None:
            advance(1)
        return c

    def best_of(cands):
        # highest score; ties go to the earlier candidate (grids list the paper's order)
        return max(cands, key=lambda c: c.score)

    if coordinate:
        best = best_of([score(a0, b) for b in betas])
        best = best_of([best] + [score(a, best.params["beta"]) for a in alphas])
    else:
        for a in alphas:
            for b in betas:
                score(a, b)
        best = best_of(tried)
    return dict(best.params), tried


def choose_correction(pair, holdout: Holdout, method: str, params: dict, stop_at=None, tasks=None, labeled=None,
                      select_by: str = "fidelity", do_repair: bool = True, repair_branches: bool = True,
                      repair_samples: int | None = None, progress=None):
    """The zip with the least-squares refit or with the statistics correction alone (``do_repair``),
    whichever scores higher on the held-out samples (ties keep the correction); returns (the zip,
    every candidate)."""
    from onnxzip.merge import compute_merges

    tasks = tasks or pair.tasks
    merges = compute_merges(pair.graphs[0], pair.stats, method, params, n_models=len(pair.graphs))
    tried, zips = [], []
    advance = stage(progress, "refit or correction", 2)
    for refit in (False, True):
        t = time.perf_counter()
        z, fid, acc = _evaluate_candidate(pair, method, params, stop_at, tasks, holdout, labeled, do_repair,
                                          repair_branches, merges, refit=refit, repair_samples=repair_samples)
        value = acc["joint"] if select_by == "accuracy" else fid.joint
        tried.append(Candidate(method, dict(params), z.stop_at, value, fid.to_dict(), acc, time.perf_counter() - t,
                               extra={"refit": refit}))
        zips.append(z)
        if advance is not None:
            advance(1)
    best = 1 if tried[1].score > tried[0].score else 0
    return zips[best], tried


def choose_depth(pair, holdout: Holdout, method: str, params: dict, tasks=None, depths=None,
                 min_fidelity: float | None = None, max_flops: float | None = None, labeled=None,
                 select_by: str = "fidelity", do_repair: bool = True, repair_branches: bool = True, progress=None,
                 allow_no_sharing: bool = False):
    """``--stop-at auto``: the deepest zip whose fidelity meets ``min_fidelity``, or the best-scoring
    zip whose FLOPs stay under ``max_flops`` (relative to running both models).

    A zip that shares no layer (the two models side by side in one file) is a candidate only with
    ``allow_no_sharing``. Returns (chosen depth, every candidate tried). Raises OptionError when
    nothing meets the target, naming the best that was reached.
    """
    from onnxzip.cost import count_flops

    if (min_fidelity is None) == (max_flops is None):
        raise OptionError("--stop-at auto needs exactly one target: --min-fidelity F or --max-flops R")
    tasks = tasks or pair.tasks
    m = pair.graphs[0].num_layers
    limit = depth_limit(pair.graphs)
    depths = sorted(set(depths or range(0, m + 1)))
    depths = [d for d in depths if d <= min(limit, m - 1) and (d >= 1 or allow_no_sharing)]
    if not depths:
        raise OptionError(f"no layer can be shared: the deepest possible zip is --stop-at {limit} (see `onnxzip inspect`)")
    both = sum(count_flops(g.model).total for g in pair.graphs)
    tried = []
    advance = stage(progress, "depth", len(depths))
    for d in sorted(depths, reverse=min_fidelity is not None):
        t = time.perf_counter()
        z, fid, acc = _evaluate_candidate(pair, method, params, d, tasks, holdout, labeled, do_repair, repair_branches)
        rel = count_flops(z.model).total / both
        value = acc["joint"] if select_by == "accuracy" else fid.joint
        c = Candidate(method, dict(params), d, value, fid.to_dict(), acc, time.perf_counter() - t, extra={"flops_rel": rel})
        tried.append(c)
        if advance is not None:
            advance(1)
        if min_fidelity is not None and value >= min_fidelity:
            return d, tried
    if min_fidelity is not None:
        best = max(tried, key=lambda c: c.score)
        raise OptionError(
            f"no zip depth{'' if allow_no_sharing else ' that shares a layer'} reaches {select_by} {min_fidelity:.3f} "
            f"(best: {best.score:.3f} at --stop-at {best.stop_at}); lower --min-fidelity"
            + ("" if allow_no_sharing else ", or pass --allow-no-sharing to accept the two models side by side")
        )
    fits = [c for c in tried if c.extra["flops_rel"] <= max_flops + 1e-9]
    if not fits:
        cheapest = min(tried, key=lambda c: c.extra["flops_rel"])
        raise OptionError(
            f"no zip depth fits in {max_flops:.2f} of the FLOPs of both models (the cheapest, --stop-at "
            f"{cheapest.stop_at}, needs {cheapest.extra['flops_rel']:.2f}); raise --max-flops"
        )
    best = max(fits, key=lambda c: (c.score, c.stop_at))
    return best.stop_at, tried


def check_depths(depths, num_layers: int) -> list[int]:
    """Sorted sweep depths (default: every depth up to the heads); OptionError for one out of range.

    Merging the final layer only makes sense for models whose outputs share one space, so depth
    ``num_layers`` is swept only when asked for."""
    depths = sorted(set(depths if depths is not None else range(0, num_layers)))
    bad = [d for d in depths if not 0 <= d <= num_layers]
    if bad:
        raise OptionError(f"--depths {bad} out of range: the models have {num_layers} layers (0..{num_layers})")
    return depths


class _SweepRows:
    """The sweep's table: cost relative to running every source model; the reference rows first
    (the ensemble, then each source model)."""

    def __init__(self, pair, holdout: Holdout, tasks: list[str], labeled, latency: bool):
        from onnxzip.cost import count_flops, count_params
        from onnxzip.evaluate import EnsemblePredictor, ModelPredictor

        self.pair, self.m, self.rows = pair, pair.graphs[0].num_layers, []
        n_lat = min(32, holdout.size)
        self.lat_feeds = {k: v[:n_lat] for k, v in holdout.feeds.items()} if latency else None
        sources = [g.model for g in pair.graphs]
        flops, params = [count_flops(s).total for s in sources], [count_params(s) for s in sources]
        lat = [self.latency(s) for s in sources]
        self.both = (sum(params), sum(flops), None if lat[0] is None else sum(lat))
        accs = [None] * (len(sources) + 1)
        if labeled is not None:
            members = [ModelPredictor(pair.sources[k], task=tasks[k]) for k in range(len(sources))]
            accs = [_accuracy(p, labeled) for p in [EnsemblePredictor(dict(zip(tasks, members))), *members]]
        self.add("reference", "ensemble", None, *self.both,
                 {"joint_agreement": 1.0, "task_agreement": {t: 1.0 for t in tasks}}, accs[0])
        for k, label in enumerate(model_labels(len(sources))):
            self.add("reference", f"model {label}", None, params[k], flops[k], lat[k], None, accs[k + 1])

    def latency(self, model) -> float | None:
        if self.lat_feeds is None:
            return None
        from onnxzip.cost import measure_latency

        # one thread and the fastest of many runs: the least noisy figure on a shared machine
        return measure_latency(model, self.lat_feeds, providers=self.pair.providers, warmup=3, repeats=30,
                               intra_op_threads=1)["min_ms"]

    def add(self, kind, method, stop_at, model_params, model_flops, model_lat, fid, acc, seconds=None, p=None) -> None:
        both_params, both_flops, both_lat = self.both
        self.rows.append({
            "kind": kind, "method": method, "params_used": p, "stop_at": stop_at,
            "shared": None if stop_at is None else f"{stop_at}/{self.m}",
            "params": model_params, "params_rel": model_params / both_params,
            "flops": model_flops, "flops_rel": model_flops / both_flops,
            "latency_ms": model_lat, "latency_rel": None if model_lat is None or not both_lat else model_lat / both_lat,
            **(fid or {}), "accuracy": acc, "seconds": seconds,
        })


def sweep(pair, holdout: Holdout, methods=("zipit", "permute", "average"), depths=None, params: dict | None = None,
          tasks=None, labeled=None, latency: bool = False, do_repair: bool = True, repair_branches: bool = True,
          progress=None) -> dict:
    """Zip at every depth (or ``depths``) with every method; one row per (method, depth).

    Rows carry shared layers n/m, parameters, FLOPs and onnxruntime latency relative to running
    both source models, fidelity, and with labels, per-task, task-average and joint accuracy.
    Reference rows: the ensemble and each source model.
    """
    from onnxzip.cost import count_flops, count_params

    tasks = tasks or pair.tasks
    m = pair.graphs[0].num_layers
    limit = depth_limit(pair.graphs)
    depths = [d for d in check_depths(depths, m) if d <= limit]
    table = _SweepRows(pair, holdout, tasks, labeled, latency)
    t_all = time.perf_counter()
    advance = stage(progress, "sweep", len(methods) * len(depths))
    for method in methods:
        mp = dict(params or {}) if method == "zipit" else {}
        for d in depths:
            t = time.perf_counter()
            try:
                z, fid, acc = _evaluate_candidate(pair, method, mp, d, tasks, holdout, labeled, do_repair, repair_branches)
            except OnnxZipError as e:
                table.rows.append({"kind": "candidate", "method": method, "stop_at": d, "error": str(e)})
            else:
                table.add("candidate", method, d, count_params(z.model), count_flops(z.model).total,
                          table.latency(z.model), fid.to_dict(), acc, time.perf_counter() - t, z.params)
            if advance is not None:
                advance(1)
    rows = table.rows
    return {"rows": rows, "num_layers": m, "max_stop_at": limit, "search_seconds": time.perf_counter() - t_all,
            "holdout_samples": holdout.size, "statistics_samples": pair.stats.samples,
            "statistics_seconds": pair.timings.get("statistics")}
