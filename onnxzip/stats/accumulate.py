"""Streaming accumulators: mean and covariance in float64, memory independent of the data size.

Sums are kept in float64. Products are formed in the data's own precision: float64 data in
float64; float32 activations (what onnxruntime returns) in float32, over chunks of
:data:`CHUNK_ROWS` rows (up to :data:`MAX_STAGED_ROWS` for wide layers) whose sums are then added
in float64 (float32 matrix products are about twice as fast; a chunk's rounding error, about
``sqrt(rows) * 6e-8`` relative, is below the activations' own precision).
"""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np

__all__ = ["CovarianceAccumulator", "SplitMoments", "as_samples", "CHUNK_ROWS", "single_threaded_blas"]

# Rows per matrix product in the activations' precision (float32), before summing in float64.
CHUNK_ROWS = 2048
# Rows staged before a Gram product: max(CHUNK_ROWS, features), at most this many.
MAX_STAGED_ROWS = 4096


def as_samples(x: np.ndarray, axis: int) -> np.ndarray:
    """Rows = samples (every position of every item), columns = channels along ``axis``."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _select(rows: np.ndarray, w: np.ndarray | None, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Flatten ``[items, positions, D]`` to float64 rows and per-row weights.

    Items of weight 0 are dropped; 0/1 weights become None (the fast, unweighted path).
    """
    if w is not None:
        w = np.asarray(w, dtype=np.float64)
        if (w == 1).all():
            w = None
        elif np.isin(w, (0.0, 1.0)).all():
            rows = rows[w == 1]
            w = None
        else:
            keep = w > 0
            rows, w = rows[keep], np.repeat(w[keep], rows.shape[1])
    return rows.reshape(-1, dim).astype(np.float64), w


class CovarianceAccumulator:
    """Mean and covariance of the columns of streamed ``[items, positions, D]`` blocks.

    Sums are taken around a fixed shift (the first block's mean) so that float64 keeps its
    precision on features with a large mean.
    """

    def __init__(self, dim: int, max_positions: int | None = None, seed=0):
        self.dim = dim
        self.count = 0.0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(dim)
        self.s2 = np.zeros((dim, dim))
        # update_blocks: at most this many positions per item (a random subset, the same for
        # every block), None for all
        self.max_positions = max_positions
        self.rng = np.random.default_rng(seed)
        # update_blocks stages centred rows here and forms their Gram matrix once the buffer is
        # full (few rows per update would otherwise pay a D x D float64 addition each)
        self._pending: np.ndarray | None = None
        self._filled = 0

    def update(self, rows: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add samples; ``rows`` is ``[items, positions, D]`` (see :func:`as_samples`)."""
        x, w = _select(rows, weights, self.dim)
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        x -= self.shift
        if w is None:
            self.count += x.shape[0]
            self.s1 += x.sum(axis=0)
            self.s2 += x.T @ x
        else:
            self.count += w.sum()
            self.s1 += w @ x
            xs = x * np.sqrt(w)[:, None]
            self.s2 += xs.T @ xs

    def update_blocks(self, blocks, weights: np.ndarray | None = None) -> None:
        """Add the samples of the channel-concatenation of several tensors, without copying them
        into ``[items, positions, D]`` first.

        ``blocks``: ``(tensor, channel axis)`` pairs sharing axis 0 (items) and positions (e.g. the
        same feature map of model A and model B); ``weights``: per item (0/1 drops items; other
        weights take the general path of :meth:`update`).
        """
        arrays = [np.asarray(a) for a, _ in blocks]
        axes = [ax for _, ax in blocks]
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if not np.isin(w, (0.0, 1.0)).all():
                self.update(np.concatenate([as_samples(a, ax) for a, ax in zip(arrays, axes)], axis=-1), w)
                return
            if not (w == 1).all():
                keep = w == 1
                arrays = [a[keep] for a in arrays]
        views = [_channels_last(a, ax) for a, ax in zip(arrays, axes)]
        n, p, _ = views[0].shape
        if n == 0 or p == 0:
            return
        if sum(v.shape[2] for v in views) != self.dim:
            raise ValueError(f"blocks have {sum(v.shape[2] for v in views)} channels, the accumulator {self.dim}")
        dtype = _work_dtype(views)
        if self.shift is None:
            self.shift = np.concatenate([v.mean(axis=(0, 1), dtype=np.float64) for v in views]).astype(dtype).astype(np.float64)
        shift = self.shift.astype(dtype)
        sample = self.max_positions is not None and p > self.max_positions
        if sample:
            p_all, p = p, self.max_positions
        per = max(1, CHUNK_ROWS // p)
        for i0 in range(0, n, per):
            i1 = min(n, i0 + per)
            buf = self._reserve((i1 - i0) * p, dtype).reshape(i1 - i0, p, self.dim)
            # a fresh random subset of positions per chunk of items, the same in every block
            index = np.sort(self.rng.choice(p_all, p, replace=False)) if sample else None
            off = 0
            for v in views:
                c = v.shape[2]
                part = v[i0:i1] if index is None else v[i0:i1, index]
                np.subtract(part, shift[off:off + c], out=buf[:, :, off:off + c])
                off += c
            self.count += (i1 - i0) * p

    def _reserve(self, rows: int, dtype) -> np.ndarray:
        """``rows`` free rows of the staging buffer (flushed first when they do not fit)."""
        if self._pending is not None and (self._pending.dtype != dtype or self._filled + rows > len(self._pending)):
            self._flush()
        if self._pending is None or self._pending.dtype != dtype or rows > len(self._pending):
            self._pending = np.empty((max(rows, CHUNK_ROWS, min(self.dim, MAX_STAGED_ROWS)), self.dim), dtype=dtype)
        out = self._pending[self._filled:self._filled + rows]
        self._filled += rows
        return out

    def _flush(self) -> None:
        if self._pending is None or self._filled == 0:
            return
        x = self._pending[:self._filled]
        self.s1 += np.ones(len(x), dtype=x.dtype) @ x
        _add_gram(self.s2, x)
        self._filled = 0

    def release(self) -> None:
        """Form the staged rows' products and free the staging buffer."""
        self._flush()
        self._pending = None

    @property
    def mean(self) -> np.ndarray:
        self._flush()
        if self.count == 0:
            return np.zeros(self.dim)
        return self.shift + self.s1 / self.count

    @property
    def covariance(self) -> np.ndarray:
        self._flush()
        if self.count == 0:
            return np.zeros((self.dim, self.dim))
        m = self.s1 / self.count
        lower = np.tril(self.s2)  # update_blocks may fill only the lower triangle
        return (lower + np.tril(lower, -1).T) / self.count - np.outer(m, m)


def _channels_last(x: np.ndarray, axis: int) -> np.ndarray:
    """``[items, positions, channels]``, a view (strided for channel-first layouts such as NCHW;
    a copy only for layouts whose positions cannot be flattened in place)."""
    if x.ndim == 1:
        return x.reshape(-1, 1, 1)
    axis = axis % x.ndim
    if axis == x.ndim - 1:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    v = np.moveaxis(x, axis, 1)  # [items, channels, ...]
    v = v.reshape(v.shape[0], v.shape[1], -1)  # a view for NCHW
    return v.transpose(0, 2, 1)


# From this many features on, Gram matrices use BLAS syrk (one triangle: half the work, faster
# than a full product on wide layers; slower on narrow ones).
SYRK_MIN_DIM = 1024


def _add_gram(s2: np.ndarray, x: np.ndarray) -> None:
    """``s2 += x.T @ x`` (``x``: rows x features, C-ordered); only the lower triangle of ``s2``
    is kept exact."""
    if x.shape[1] >= SYRK_MIN_DIM:
        from scipy.linalg import blas

        syrk = blas.ssyrk if x.dtype == np.float32 else blas.dsyrk
        # x.T is Fortran-ordered (features x rows): C = x^T x, upper triangle, Fortran order;
        # its transpose is a C-ordered view holding the lower triangle
        s2 += syrk(1.0, x.T, trans=0).T
        return
    s2 += x.T @ x


def _work_dtype(views) -> type:
    return np.float32 if all(v.dtype == np.float32 for v in views) else np.float64


class SplitMoments:
    """Per-channel mean and variance of one streamed tensor, split by item masks in one pass.

    Each update takes ``masks`` ``[parts, items]`` (0/1): which items count toward each part (e.g.
    the samples each model owns, and the rest). Per-item sums are taken once (float64 sums of
    products in the data's precision), so any union of parts can be read out too.
    """

    def __init__(self, dim: int, parts: int):
        self.dim = dim
        self.parts = parts
        self.shift: np.ndarray | None = None
        self.count = np.zeros(parts)
        self.s1 = np.zeros((parts, dim))
        self.s2 = np.zeros((parts, dim))

    def update(self, x: np.ndarray, axis: int, masks: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim > 1 and axis % x.ndim == x.ndim - 1:
            # channel-last: [items, positions, channels]
            v, positions_axis = x.reshape(x.shape[0], -1, x.shape[-1]), 1
        else:
            # [items, channels, positions]: a view for channel-first layouts (NCHW), so the sums
            # over positions run along contiguous memory (numpy's pairwise summation)
            v = np.moveaxis(x, axis, 1) if x.ndim > 1 else x.reshape(-1, 1)
            v, positions_axis = v.reshape(v.shape[0], v.shape[1], -1), 2
        masks = np.asarray(masks, dtype=np.float64).reshape(self.parts, v.shape[0])
        keep = masks.any(axis=0)
        p = v.shape[positions_axis]
        if not keep.any() or p == 0:
            return
        if not keep.all():
            v, masks = v[keep], masks[:, keep]
        dtype = _work_dtype([v])
        if self.shift is None:
            self.shift = v.mean(axis=(0, positions_axis), dtype=np.float64).astype(dtype).astype(np.float64)
        shift = self.shift.astype(dtype)
        if positions_axis == 2:
            shift = shift[:, None]
        n = v.shape[0]
        per = max(1, (1 << 20) // max(1, p * self.dim))  # about 4 MB of float32 at a time
        for i0 in range(0, n, per):
            i1 = min(n, i0 + per)
            xc = v[i0:i1] - shift
            m = masks[:, i0:i1]
            self.s1 += m @ xc.sum(axis=positions_axis).astype(np.float64)
            np.multiply(xc, xc, out=xc)
            self.s2 += m @ xc.sum(axis=positions_axis).astype(np.float64)
            self.count += m.sum(axis=1) * p

    def moments(self, parts) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean, variance and count over the union of ``parts`` (indices)."""
        parts = list(parts)
        count = float(self.count[parts].sum())
        if count == 0:
            return np.zeros(self.dim), np.zeros(self.dim), 0.0
        s1 = self.s1[parts].sum(axis=0) / count
        s2 = self.s2[parts].sum(axis=0) / count
        return self.shift + s1, np.maximum(s2 - s1 * s1, 0.0), count


# ------------------------------------------------------------------------------------------------
# BLAS threads. The statistics pass alternates onnxruntime runs (its own thread pool) and numpy
# products; a multi-threaded BLAS keeps its worker threads spinning after each product, which takes
# cores from onnxruntime (and on a loaded machine its barriers stall): the pass ran 2x slower on
# the 2-core benchmark machine. The accumulators therefore run with one BLAS thread, on a worker
# thread of their own that overlaps onnxruntime (see collect_stats).
# ------------------------------------------------------------------------------------------------

_OPENBLAS_SETTERS = (
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
)


def _openblas_libs() -> list:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in _OPENBLAS_SETTERS:
            if hasattr(lib, get) and hasattr(lib, set_):
                found.append((getattr(lib, get), getattr(lib, set_)))
                break
    return found


@contextlib.contextmanager
def single_threaded_blas():
    """Limit BLAS to one thread inside the block (threadpoolctl when installed, else OpenBLAS
    through ctypes; a no-op where neither applies)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    libs = _openblas_libs()
    before = []
    for get, set_ in libs:
        try:
            before.append((set_, int(get())))
            set_(1)
        except Exception:  # noqa: BLE001 - a foreign library: leave it alone
            pass
    try:
        yield
    finally:
        for set_, n in before:
            set_(n)
