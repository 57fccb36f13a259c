"""zip_models(): a whole zip, the one function the CLI's zip calls.

prepare the pair (onnxzip.pipeline) -> if asked, the label-free searches for alpha, beta and depth
(onnxzip.select) -> the chosen zip (onnxzip.pipeline.zip_prepared) -> atomic save (onnxzip.io).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import onnx

from onnxzip.data import data_files
from onnxzip.errors import OptionError
from onnxzip.io import check_output_path, save_model
from onnxzip.matchers import get_matcher, validate_params
from onnxzip.normalize import check_input_layout
from onnxzip.pipeline import ZipResult, check_depth, collect_pair_stats, labeled_data, prepare_models, resolve_stop_at, zip_prepared
from onnxzip.select import choose_correction, choose_depth, make_holdout, search_alpha_beta

__all__ = ["zip_models"]


def zip_models(model_a, model_b=None, data=None, output: str | os.PathLike | None = None, method: str = "zipit",
               params: dict | None = None, stop_at=None, tasks: list[str] | None = None, do_repair: bool = True,
               repair_branches: bool = True, batch_size: int = 64, max_samples: int | None = None, providers=None,
               progress=None, holdout: float | None = None, search: str = "coordinate", select_by: str = "fidelity",
               select_data: dict | None = None, min_fidelity: float | None = None, max_flops: float | None = None,
               input_layout: str | None = None, repair_samples: int | None = None, allow_no_sharing: bool = False,
               classes: dict | None = None,
               all_positions: bool = True, seed: int = 0, refit: bool | None = None,
               refit_ridge: float | None = None) -> ZipResult:
    """Zip two or more models of the same architecture into one multi-task model.

    ``zip_models(a, b, data, ...)`` zips two models; ``zip_models([m1, ..., mN], data, ...)``
    (or ``zip_models([m1, ..., mN], data=data, ...)``) zips N >= 2: one shared trunk, one head
    per model.

    Args:
        model_a, model_b: paths to ONNX files (or ModelProtos); or model_a a list of N of them,
            and then model_b the calibration data unless ``data`` is given.
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
        refit: fit every zipped layer to the sources' outputs by least squares, in place of the
            statistics correction (:func:`onnxzip.refit.refit`). None (default): the refit, unless
            the correction alone scores higher on the held-out samples
            (:func:`onnxzip.select.choose_correction`; with ``holdout`` 0, the refit); with
            ``do_repair`` False, no refit unless True.
            ``refit_ridge``: one relative ridge for every layer (default: chosen per layer on
            held-out calibration rows).
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
    models, data = _models_and_data(model_a, model_b, data)
    fixed, auto = _matcher_params(method, params, len(models))
    if refit is None and not do_repair:
        refit = False  # no correction asked for: the merge as it is
    auto_depth = isinstance(stop_at, str) and stop_at == "auto"
    if not auto_depth and (min_fidelity is not None or max_flops is not None):
        raise OptionError("--min-fidelity and --max-flops go with --stop-at auto")
    if auto_depth and (min_fidelity is None) == (max_flops is None):
        raise OptionError("--stop-at auto needs exactly one target: --min-fidelity F or --max-flops R")
    _check_search_options(stop_at, search, select_by, select_data, min_fidelity, max_flops)
    check_input_layout(input_layout)
    if holdout is None:
        holdout = 0.2 if (auto or auto_depth or refit is None) else 0.0
    if output is not None:
        check_output_path(output, [p for p in models if not isinstance(p, onnx.ModelProto)], data_files(data))
    pair = prepare_models(models, data, batch_size, max_samples, providers, tasks, collect=False,
                        holdout=holdout, input_layout=input_layout, classes=classes)
    if not auto_depth:  # a depth the models cannot reach is refused before the statistics pass
        depth = resolve_stop_at(stop_at, pair.graphs[0].num_layers)
        check_depth(pair.graphs, depth, pair.sources)
    collect_pair_stats(pair, progress, all_positions, repair_samples, seed)
    params, selection = fixed, None
    choice = _Choice(method, fixed, auto, search, select_by, select_data, min_fidelity, max_flops,
                     allow_no_sharing, do_repair, repair_branches, progress)
    if auto or auto_depth:
        params, stop_at, selection = choice.run(pair, stop_at)
    if refit is None and pair.holdout > 0:
        result, selection = choice.correction(pair, params, stop_at, tasks, repair_samples, selection)
    else:
        result = zip_prepared(pair, method, params, stop_at, tasks, do_repair, repair_branches, progress=progress,
                              repair_samples=repair_samples, refit=refit is not False, refit_ridge=refit_ridge)
    result.timings = {**pair.timings, **result.timings}
    result.selection = selection
    result.sources = [g.model for g in pair.graphs]  # normalized, inputs aligned to the zipped model's layout
    if output is not None:
        t = time.perf_counter()
        save_model(result.model, output)
        result.timings["save"] = time.perf_counter() - t
        result.output = str(output)
    return result


def _models_and_data(model_a, model_b, data) -> tuple[list, object]:
    """The models to zip and the calibration data, from either calling form of :func:`zip_models`."""
    if isinstance(model_a, (list, tuple)):
        if data is None:
            model_b, data = None, model_b
        if model_b is not None:
            raise OptionError("give the models as one list, then the data: zip_models([m1, ..., mN], data)")
        models = list(model_a)
    else:
        models = [model_a, model_b]
    if data is None:
        raise OptionError("no calibration data: pass data (an .npz file or folder, or {task: path})")
    if len(models) < 2 or any(m is None for m in models):
        raise OptionError(f"zipping needs at least 2 models, got {sum(m is not None for m in models)}")
    return models, data


def _matcher_params(method: str, params: dict | None, n_models: int = 2) -> tuple[dict, list[str]]:
    """The parameters the user fixed (checked) and those to search; zipit's alpha and beta are
    searched unless given."""
    matcher = get_matcher(method)
    params = dict(params or {})
    if "num_models" in params and str(params["num_models"]).strip() != str(n_models):
        raise OptionError(f"num_models={params['num_models']}: the number of models is the number of files "
                          f"given ({n_models}); it is not a parameter to set")
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
    return fixed, auto


@dataclass
class _Choice:
    """The label-free choices of a zip: alpha and beta (``auto``), then the depth (``stop_at="auto"``)."""

    method: str
    fixed: dict
    auto: list
    search: str
    select_by: str
    select_data: dict | None
    min_fidelity: float | None
    max_flops: float | None
    allow_no_sharing: bool
    do_repair: bool
    repair_branches: bool
    progress: object

    def holdout(self, pair):
        if not hasattr(self, "_holdout"):
            self._holdout = make_holdout(pair)
            self._labeled = labeled_data(self.select_data, pair) if self.select_data else None
        return self._holdout, self._labeled

    def correction(self, pair, params: dict, stop_at, tasks, repair_samples, selection: dict | None):
        """The zip with the refit or with the correction alone, whichever scores higher on the
        held-out samples; the selection record gains the two candidates and the reason."""
        t = time.perf_counter()
        hold, labeled = self.holdout(pair)
        result, tried = choose_correction(pair, hold, self.method, params, stop_at, tasks, labeled, self.select_by,
                                          self.do_repair, self.repair_branches, repair_samples, self.progress)
        selection = selection or {"holdout_samples": hold.size, "select_by": self.select_by, "candidates": [],
                                  "reason": ""}
        selection["correction_candidates"] = [c.to_dict() for c in tried]
        selection["refit"] = result.refit is not None
        plain = "the statistics correction" if self.do_repair else "no correction"
        what = "joint agreement with the ensemble" if self.select_by == "fidelity" else "joint accuracy"
        reason = (f"{'refit' if result.refit is not None else plain}: {what} {max(c.score for c in tried):.3f} "
                  f"against {min(c.score for c in tried):.3f} with {plain if result.refit is not None else 'the refit'}")
        selection["reason"] = "; ".join(r for r in (selection.get("reason"), reason) if r)
        seconds = time.perf_counter() - t
        selection["search_seconds"] = selection.get("search_seconds", 0.0) + seconds
        # the other candidate and the two fidelity runs: what choosing cost beyond the zip kept
        kept = sum(result.timings.get(k, 0.0) for k in ("matching", "rewrite", "refit", "repair", "validate"))
        result.timings = {**result.timings, "correction choice": max(0.0, seconds - kept)}
        return result, selection

    def run(self, pair, stop_at) -> tuple[dict, int | str | None, dict]:
        """(parameters, depth, the selection record) chosen on held-out calibration samples;
        ``stop_at`` "auto" is chosen after alpha and beta (which are scored at the default depth)."""
        auto_depth = stop_at == "auto"
        if auto_depth:
            stop_at = None
        t = time.perf_counter()
        hold, labeled = self.holdout(pair)
        selection = {"holdout_samples": hold.size, "select_by": self.select_by, "candidates": []}
        params, reasons = dict(self.fixed), []
        common = dict(tasks=pair.tasks, labeled=labeled, select_by=self.select_by, do_repair=self.do_repair,
                      repair_branches=self.repair_branches, progress=self.progress)
        if self.auto:
            best, tried = search_alpha_beta(pair, hold, stop_at=stop_at, search=self.search, fixed=self.fixed, **common)
            params.update(best)
            selection["alpha_beta"] = best
            selection["candidates"] += [c.to_dict() for c in tried]
            reasons.append(_chosen_because(best, tried, self.select_by, hold.size))
        if auto_depth:
            stop_at, tried = choose_depth(pair, hold, self.method, dict(params), min_fidelity=self.min_fidelity,
                                          max_flops=self.max_flops, allow_no_sharing=self.allow_no_sharing, **common)
            selection["stop_at"] = stop_at
            selection["candidates"] += [c.to_dict() for c in tried]
            target = (f"{self.select_by} >= {self.min_fidelity}" if self.min_fidelity is not None
                      else f"FLOPs <= {self.max_flops} of both models")
            reasons.append(f"depth {stop_at}: " + ("the deepest" if self.min_fidelity is not None else "the best")
                           + f" with {target}")
        selection["reason"] = "; ".join(reasons)
        selection["search_seconds"] = time.perf_counter() - t
        pair.timings["search"] = selection["search_seconds"]
        return params, stop_at, selection


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
