"""Least-squares refit of the zipped layers (method.md, "Beyond the paper: fitting merged layers").

Merging averages matched features; the statistics correction (:mod:`onnxzip.repair`) then fixes
each channel's mean and spread. The refit instead sets every zipped weight layer, in topological
order (one level of the layer graph at a time, as the correction does), to the ridge least-squares
solution of

    W x_m + b  ~  y*        y* = sum_k M_k y_k   (trunk layers),   y* = y_k   (model k's branch)

where ``x_m`` is the layer's input as the zipped model computes it (the earlier levels already
refitted), ``y_k`` is source model k's output of the same layer on the same calibration rows, and
``M_k`` is model k's block of the merge matrix. The targets are taken on every row (method.md:
per-task targets overfit small calibration sets; heads fitted on all samples help joint accuracy).
Only the normal equations are kept: the Gram matrix of ``[x_m, 1]`` and its cross-covariance with
``y*``, streamed in float64, so memory does not grow with the number of rows. Convolutions are
fitted through their patches (``C_in/group * kh * kw`` inputs per output channel, one system per
group); Gemm and MatMul through their feature axis.

Every fifth calibration row is held out while the ridge strength is chosen (per layer, from
:data:`RIDGES` relative to the mean diagonal of the Gram matrix); the final solve uses all rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import scipy.linalg

from onnxzip.errors import InternalError
from onnxzip.graph.samples import samples_first, samples_first_axis
from onnxzip.merge import Merges
from onnxzip.onnx_nodes import attr, conv_pads
from onnxzip.frontier import RUN_BUDGET_BYTES, Frontier, FrontierPlan, Weights, subset_rows
from onnxzip.repair import default_repair_samples, shift_layer
from onnxzip.split import LayerSite, ZipLayout
from onnxzip.stats.collect import PairStats, has_static_batch, per_row, subset_step

__all__ = ["RefitReport", "refit", "RIDGES", "HOLDOUT_EVERY", "MAX_INPUTS"]

# Ridge strengths tried per layer, relative to the inputs' mean variance (method.md: 1e-4 to 1e-2
# of trace(X^T X) / d barely moved accuracy on the digit pairs; on the bundled pairs a fixed 1e-4
# or 1e-2 for every layer moves joint accuracy by at most 3 points against this choice). The
# smallest is least squares in all but name and keeps every solve a Cholesky factorization.
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2)
# Every HOLDOUT_EVERY-th calibration row scores the ridge candidates.
HOLDOUT_EVERY = 5
# Layers with more inputs per output channel keep their merged weights: the Gram matrix grows with
# the square of this (4608, a 3x3 conv over 512 channels: 170 MB per matrix, two kept per layer) and
# the solve with its cube (a 25088-input classifier, VGG's, would take 5 GB and minutes).
MAX_INPUTS = 4608
# Rows per float32 product before the sum moves to float64 (the rounding of a float32 sum grows
# with the number of its terms).
BLOCK_ROWS = 1024
# Input rows (positions x inputs per group) materialized at once while accumulating: 128 MiB of float64.
ROWS_BUDGET = 1 << 24


# The layers a refit sets: those linear in their input (a Gather's lookup table is not refitted).
_FITTED = ("Conv", "Gemm", "MatMul")


@dataclass
class RefitReport:
    layers: int
    passes: int
    samples: int
    ridges: dict = field(default_factory=dict)  # layer node -> chosen ridge (relative)
    kept: dict = field(default_factory=dict)  # layer node -> why it keeps its merged weights


@dataclass
class _Conv:
    kernel: tuple
    strides: tuple
    dilations: tuple
    pads: tuple  # begin..., end...
    group: int


class _Normal:
    """The normal equations of one layer's change from ``start`` (its merged weights, bias last:
    [groups, d + 1, out]): the Gram matrix of ``[x, 1]`` and its cross-moments with the residual
    ``y - [x, 1] start``, per group, on fitted and held-out rows. Fitting the residual keeps a
    self-zip exact (its residual is rounding) and lets the ridge pull toward the merge, not zero:
    where the calibration inputs do not span a direction, the merge's weights stay."""

    def __init__(self, start: np.ndarray, free_bias: bool = True):
        groups, d1, out = start.shape
        self.start = start
        self.start32 = start.astype(np.float32)
        self.free_bias = free_bias  # False: the bias stays (a MatMul with no bias to change)
        self.gram = np.zeros((2, groups, d1, d1))
        self.cross = np.zeros((2, groups, d1, out))

    def add(self, part: int, x: np.ndarray, y: np.ndarray) -> None:
        """``x``: [rows, groups, d]; ``y``: [rows, groups, out]. Products of :data:`BLOCK_ROWS` rows
        at a time in float32 (BLAS), summed in float64. The residual is formed per row, so a layer that
        already fits (a self-zip) accumulates rounding, not a difference of two large sums."""
        if not len(x):
            return
        x = np.concatenate([x, np.ones(x.shape[:2] + (1,), dtype=x.dtype)], axis=2)
        xt = np.ascontiguousarray(x.transpose(1, 2, 0), dtype=np.float32)  # [groups, d + 1, rows]
        yt = np.ascontiguousarray(y.transpose(1, 0, 2), dtype=np.float32)  # [groups, rows, out]
        for start in range(0, xt.shape[2], BLOCK_ROWS):
            xb = xt[:, :, start:start + BLOCK_ROWS]
            residual = yt[:, start:start + BLOCK_ROWS] - xb.transpose(0, 2, 1) @ self.start32
            self.gram[part] += xb @ xb.transpose(0, 2, 1)
            self.cross[part] += xb @ residual

    def solve(self, ridge: float | None) -> tuple[np.ndarray, float]:
        """(W [groups, d + 1, out], the ridge used): ``ridge``, or the candidate of :data:`RIDGES`
        with the least error on the held-out rows."""
        if ridge is None:
            ridge = self._choose()
        gram, cross = self.gram.sum(axis=0), self.cross.sum(axis=0)
        return self.start + _ridge_solve(gram, cross, ridge, self.free_bias), ridge

    def _choose(self) -> float:
        if not self.gram[1, :, -1, -1].all() or not self.gram[0, :, -1, -1].all():
            return RIDGES[len(RIDGES) // 2]  # no held-out rows (or no fitted ones) to choose with
        best, best_err = RIDGES[0], np.inf
        for r in RIDGES:
            change = _ridge_solve(self.gram[0], self.cross[0], r, self.free_bias)
            # held-out squared error, up to the residual's own sum of squares (the same for every candidate)
            err = float(np.einsum("gio,gij,gjo->", change, self.gram[1], change, optimize=True)
                        - 2 * np.einsum("gio,gio->", change, self.cross[1]))
            if err < best_err:
                best, best_err = r, err
        return best


def _moments(gram: np.ndarray, cross: np.ndarray, free_bias: bool) -> tuple:
    """(mean_x, mean_y, cov_x, cov_xy) per group from the normal equations of ``[x, 1]``; with a
    fixed bias the second moments about zero (the fit has no constant to absorb the means)."""
    n = np.maximum(gram[:, -1, -1], 1.0)[:, None]
    mean_x, mean_y = gram[:, :-1, -1] / n, cross[:, -1, :] / n
    if not free_bias:
        mean_x, mean_y = np.zeros_like(mean_x), np.zeros_like(mean_y)
    cov = gram[:, :-1, :-1] / n[:, :, None] - mean_x[:, :, None] * mean_x[:, None, :]
    cxy = cross[:, :-1, :] / n[:, :, None] - mean_x[:, :, None] * mean_y[:, None, :]
    return mean_x, mean_y, cov, cxy


def _ridge_solve(gram: np.ndarray, cross: np.ndarray, ridge: float, free_bias: bool = True) -> np.ndarray:
    """Per group, the change [d + 1, out] that minimizes the squared error of the normal equations
    plus ``lam |change without its bias row|^2``, ``lam = ridge * trace(cov_x) / d``: with the bias
    free, the ridge fit of the centred inputs to the centred targets (``W = (cov_x + lam)^-1
    cov_xy``) plus the bias that matches the means; one Cholesky factorization per group."""
    mean_x, mean_y, cov, cxy = _moments(gram, cross, free_bias)
    d = cov.shape[1]
    w = np.empty_like(cxy)
    for g in range(cov.shape[0]):
        a = cov[g].copy()
        a[np.diag_indices(d)] += ridge * max(np.trace(cov[g]) / max(d, 1), 1e-30)
        try:
            w[g] = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, check_finite=False), cxy[g], check_finite=False)
        except np.linalg.LinAlgError:
            w[g] = np.linalg.lstsq(a, cxy[g], rcond=None)[0]
    b = mean_y - np.einsum("gd,gdo->go", mean_x, w)
    return np.concatenate([w, b[:, None, :]], axis=1)


def _conv_of(node: onnx.NodeProto, x_shape: tuple, w_shape: tuple) -> _Conv:
    spatial = len(w_shape) - 2
    kernel = tuple(w_shape[2:])
    strides = tuple(attr(node, "strides", [1] * spatial))
    dilations = tuple(attr(node, "dilations", [1] * spatial))
    pads = tuple(conv_pads(node, x_shape, kernel, strides, dilations))
    return _Conv(kernel, strides, dilations, pads, int(attr(node, "group", 1)))


def _patches(x: np.ndarray, conv: _Conv) -> np.ndarray:
    """[N, C, *spatial] -> [N, *out_spatial, C, *kernel]: each output position's receptive field."""
    spatial = x.ndim - 2
    pad = [(0, 0), (0, 0)] + [(conv.pads[k], conv.pads[spatial + k]) for k in range(spatial)]
    xp = np.pad(x, pad)
    span = [(conv.kernel[k] - 1) * conv.dilations[k] + 1 for k in range(spatial)]
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + spatial)))
    # win: [N, C, *positions, *span]; keep strided positions and dilated taps
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in conv.strides) \
        + tuple(slice(None, None, d) for d in conv.dilations)
    win = win[index]
    order = (0,) + tuple(range(2, 2 + spatial)) + (1,) + tuple(range(2 + spatial, 2 + 2 * spatial))
    return win.transpose(order)


class _Site:
    """One zipped layer being refitted: how its rows are read and where its fit is written."""

    def __init__(self, site: LayerSite, node: onnx.NodeProto, weight: np.ndarray, layouts: tuple = (None, None)):
        self.site = site
        self.layouts = layouts  # where the input and the pre-activation hold their samples (None: axis 0)
        self.node = node
        self.x = node.input[0]
        self.weight_shape = weight.shape
        self.conv: _Conv | None = None  # set from the first input seen (SAME padding needs its size)
        self.groups = int(attr(node, "group", 1)) if node.op_type == "Conv" else 1
        self.normal: _Normal | None = None  # see start()

    def accumulate(self, part: int, x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> None:
        """Add the samples in ``keep`` to the normal equations (``part`` 0: fitted, 1: held out), a
        few samples at a time so that their patches stay under :data:`ROWS_BUDGET` values."""
        index = np.flatnonzero(keep)
        if not index.size:
            return
        in_axis = 1 if self.node.op_type != "MatMul" else x.ndim - 1
        x, self.in_axis = _rows_first(x, self.layouts[0], in_axis, len(keep))
        y, self.out_axis = _rows_first(y, self.layouts[1], self.site.channel_axis, len(keep))
        per_sample = int(np.prod(y.shape[1:], dtype=np.int64)) // max(1, y.shape[self.out_axis])
        width = self.normal.gram.shape[-1] * self.groups
        step = max(1, ROWS_BUDGET // max(1, per_sample * width))
        for start in range(0, index.size, step):
            sel = np.zeros_like(keep)
            sel[index[start:start + step]] = True
            self.normal.add(part, *self.rows(x, y, sel))

    def rows(self, x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The layer's input rows [R, groups, d] and target rows [R, groups, out] of the samples in ``keep``."""
        x, y = x[keep], y[keep]
        if self.node.op_type == "Conv":
            if self.conv is None:
                self.conv = _conv_of(self.node, x.shape, self.weight_shape)
            g = self.conv.group
            p = _patches(x, self.conv)  # [N, *pos, C, *kernel]
            n_pos = int(np.prod(p.shape[1:1 + x.ndim - 2], dtype=np.int64))
            c = x.shape[1]
            p = p.reshape((len(x) * n_pos, g, c // g) + p.shape[2 + x.ndim - 2:])
            xr = p.reshape(len(x) * n_pos, g, -1)
            yr = np.moveaxis(y, 1, -1).reshape(len(x) * n_pos, g, -1)
            return xr, yr
        xr = np.moveaxis(x, self.in_axis, -1).reshape(-1, 1, x.shape[self.in_axis])
        yr = np.moveaxis(y, self.out_axis, -1).reshape(-1, 1, y.shape[self.out_axis])
        return xr, yr

    def start(self, weights: Weights) -> None:
        """Start the normal equations from the layer's weights now (before this level's rows)."""
        self.normal = _Normal(self.current(weights), free_bias=self.node.op_type != "MatMul" or _has_bias(weights, self.site))

    def current(self, weights: Weights) -> np.ndarray:
        """The layer's weights now, as the solution's [groups, d + 1, out] (its total bias last)."""
        site = self.site
        w = weights.get(site.weight).astype(np.float64)
        groups = self.groups
        if self.node.op_type == "Conv":
            per = w.reshape(groups, w.shape[0] // groups, -1)  # [groups, out, d]
            coef = per.transpose(0, 2, 1)
        else:
            coef = (w if site.out_axis == 1 else w.T)[None]
        bias = _total_bias(weights, site, coef.shape[0] * coef.shape[2]).reshape(groups, 1, -1)
        return np.concatenate([coef, bias], axis=1)

    def write(self, model: onnx.ModelProto, weights: Weights, solution: np.ndarray) -> None:
        """Set the weight and the layer's total bias from ``solution`` [groups, d + 1, out]."""
        site = self.site
        w = weights.get(site.weight)
        coef, bias = solution[:, :-1, :], solution[:, -1, :].reshape(-1)
        if self.node.op_type == "Conv":
            new = np.concatenate([coef[g].T for g in range(coef.shape[0])], axis=0).reshape(w.shape)
        else:
            new = coef[0] if site.out_axis == 1 else coef[0].T
        weights.set(site.weight, new.astype(w.dtype))
        if self.normal.free_bias:
            shift_layer(model, weights, site, bias - _total_bias(weights, site, len(bias)))


def _rows_first(t: np.ndarray, layout: tuple | None, axis: int, rows: int) -> tuple[np.ndarray, int]:
    """``t`` with one entry per calibration row on axis 0, and where ``axis`` went: samples moved
    from where the layer graph found them (sequence-first attention), or a [rows * tokens, C] view
    unfolded."""
    if layout is not None:
        return samples_first(t, layout, rows), samples_first_axis(layout, axis % t.ndim)
    return per_row(t, axis, rows)


def _has_bias(weights: Weights, site: LayerSite) -> bool:
    """Whether the layer's pre-activation has a per-channel constant to change (without a new node)."""
    if site.bias is not None:
        return True
    if site.chain:
        _, init, axis, _ = site.chain[0]
        c = weights.get(init)
        return c.ndim > axis and c.shape[axis] > 1
    return False


def _total_bias(weights: Weights, site: LayerSite, channels: int) -> np.ndarray:
    """The constant the layer's pre-activation adds per channel: its bias and the bias Adds after it."""
    total = np.zeros(channels)
    if site.bias is not None:
        total += weights.get(site.bias).astype(np.float64).reshape(-1)
    for _, init, axis, sign in site.chain:
        c = weights.get(init).astype(np.float64)
        v = c.reshape(-1) if c.ndim == 0 or c.size == 1 else np.moveaxis(c, axis, -1).reshape(-1, c.shape[axis])[0]
        total += sign * (np.full(channels, v[0]) if v.size == 1 else v)
    return total


def refit(model: onnx.ModelProto, layout: ZipLayout, graphs, merges: Merges, stats: PairStats, batches,
          providers=None, branches: bool = True, progress=None, max_samples: int | None = None,
          ridge: float | None = None) -> RefitReport:
    """Refit the zipped model's layers in place; ``batches()`` yields calibration batches afresh.

    ``branches``: refit the layers of each task's branch too (toward their own model's outputs on
    every row), output layers included. ``max_samples``: calibration rows used (an evenly spread
    subset; default as the statistics correction's, ``0``: all). ``ridge``: one relative ridge for
    every layer instead of the held-out choice.
    """
    if max_samples is None:
        max_samples = default_repair_samples(stats)
    weights = Weights(model)
    sites = [s for s in layout.sites if s.model == -1 or branches]
    levels = sorted({(s.model >= 0, float(s.number)) for s in sites})
    if not levels:
        return RefitReport(layers=0, passes=0, samples=0)
    per_run = max(1, int(RUN_BUDGET_BYTES // stats.activation_bytes)) if getattr(stats, "activation_bytes", 0) else None
    step = subset_step(stats.samples, None if max_samples <= 0 else int(max_samples))
    chunks, feeds, rows = subset_rows(batches, stats.owners, step, has_static_batch(model), per_run)
    frontier = Frontier(model, weights, chunks, feeds, providers)
    sources = []
    for g in graphs:
        # each frontier releases its own copies of the input chunks
        renamed = {name: list(feeds[graphs[0].inputs[j]]) for j, name in enumerate(g.inputs) if graphs[0].inputs[j] in feeds}
        sources.append(Frontier(g.model, Weights(g.model), chunks, renamed, providers))
    report = RefitReport(layers=len(sites), passes=0, samples=rows)
    for level in levels:
        group = [s for s in sites if (s.model >= 0, float(s.number)) == level]
        _refit_level(model, weights, frontier, sources, group, graphs, merges, ridge, report)
        report.passes += 1
        if progress is not None:
            progress(1)
    return report


def _source_targets(sources: list[Frontier], group: list, graphs) -> dict:
    """(model, layer index) -> the source's pre-activation of that layer, one array per chunk."""
    wanted: dict[int, dict[str, int]] = {}
    for s in group:
        for k in ([s.model] if s.model >= 0 else range(len(graphs))):
            wanted.setdefault(k, {})[graphs[k].layers[s.index].preact] = s.index
    out = {}
    for k, names in wanted.items():
        kept: dict[str, list] = {n: [] for n in names}

        def keep(chunk, values, kept=kept):
            for n in kept:
                kept[n].append(values[n])

        plan = sources[k].plan(list(names), set(), {})
        fetched = sources[k].execute(plan, keep)
        sources[k].commit(plan, fetched, {})
        for n, index in names.items():
            out[(k, index)] = kept[n]
    return out


def _refit_level(model, weights: Weights, frontier: Frontier, sources: list[Frontier], group: list, graphs,
                 merges: Merges, ridge: float | None, report: RefitReport) -> None:
    nodes = {n.name: n for n in model.graph.node}
    fits: list[_Site] = []
    for s in group:
        node = nodes.get(s.node)
        if node is None:
            raise InternalError(f"refit: no node '{s.node}' in the zipped model")
        if node.op_type not in _FITTED or graphs[0].layers[s.index].token_mixing:
            # a lookup table (token embedding) keeps its merged rows; a token-mixing layer's rows
            # are (sample, channel) pairs, and the merged model's channels are not the sources'
            report.kept[s.node] = "a lookup table" if node.op_type not in _FITTED else "token mixing"
            continue
        weight = weights.get(s.weight)
        inputs = int(np.prod(weight.shape[1:], dtype=np.int64)) if node.op_type == "Conv" else weight.shape[1 - s.out_axis]
        if inputs > MAX_INPUTS:
            report.kept[s.node] = f"{inputs} inputs per output (more than {MAX_INPUTS})"
            continue
        layer = graphs[0].layers[s.index]
        layouts = (graphs[0].sample_layout(layer.input), graphs[0].sample_layout(layer.preact))
        fits.append(_Site(s, node, weight, layouts))
        fits[-1].start(weights)
    if not fits:
        return
    targets = _source_targets(sources, [f.site for f in fits], graphs)
    # each trunk layer's merge matrices (model k's block of M), built once for all chunks
    mixes = {f.site.index: [merges.merge(graphs[0].layers[f.site.index].out_space, k) for k in range(len(graphs))]
             for f in fits if f.site.model < 0}
    inputs = list(dict.fromkeys(f.x for f in fits))
    changed = set().union(*({f.site.node} | {c[0] for c in f.site.chain} for f in fits))
    plan: FrontierPlan = frontier.plan(inputs, changed, {})
    counter = {"chunk": 0, "row": 0}

    def accumulate(chunk, values) -> None:
        c = counter["chunk"]
        index = counter["row"] + np.cumsum(chunk.valid) - 1
        held = chunk.valid & (index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)
        fitted = chunk.valid & ~held
        for f in fits:
            s = f.site
            x = values[f.x]
            if s.model >= 0:
                y = targets[(s.model, s.index)][c]
            else:
                y = None
                for k, m in enumerate(mixes[s.index]):
                    yk = np.moveaxis(targets[(k, s.index)][c].astype(np.float64), s.channel_axis, -1) @ m.T
                    y = yk if y is None else y + yk
                y = np.moveaxis(y, -1, s.channel_axis)
            for part, keep in ((0, fitted), (1, held)):
                f.accumulate(part, x, y, keep)
        counter["chunk"] += 1
        counter["row"] += int(chunk.valid.sum())

    fetched = frontier.execute(plan, accumulate)
    for f in fits:
        solution, used = f.normal.solve(ridge)
        f.write(model, weights, solution)
        report.ridges[f.site.node] = used
    frontier.commit(plan, fetched, {})
