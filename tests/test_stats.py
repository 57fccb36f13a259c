"""Streaming statistics equal numpy's on all the data at once."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxzip.data import open_data
from onnxzip.pipeline import prepare_pair
from onnxzip.stats.accumulate import CovarianceAccumulator, SplitMoments, as_samples
from onnxzip.stats.collect import fetch_model


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 6), st.integers(0, 10_000))
def test_covariance_accumulator_equals_numpy(dim, rows, batches, seed):
    rng = np.random.default_rng(seed)
    blocks = [rng.normal(3.0, 2.0, size=(rng.integers(1, rows + 1), 3, dim)) for _ in range(batches)]
    acc, mom = CovarianceAccumulator(dim), SplitMoments(dim, 1)
    for b in blocks:
        acc.update(b)
        mom.update(b, 2, np.ones((1, len(b))))
    x = np.concatenate([b.reshape(-1, dim) for b in blocks])
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acc.covariance, np.cov(x.T, bias=True).reshape(dim, dim), rtol=1e-7, atol=1e-9)
    mean, var, count = mom.moments([0])
    assert count == len(x)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-7, atol=1e-9)


def test_weighted_updates_drop_and_weight_items():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4, 3))
    w = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=float)
    acc = CovarianceAccumulator(3)
    acc.update(x, w)
    kept = x[w == 1].reshape(-1, 3)
    np.testing.assert_allclose(acc.covariance, np.cov(kept.T, bias=True), atol=1e-12)
    split = SplitMoments(3, 2)  # the kept items, and the others (channel-first: [items, C, positions])
    split.update(x.transpose(0, 2, 1), 1, np.stack([w == 1, w == 0]))
    mean, var, count = split.moments([0])
    assert count == kept.shape[0]
    np.testing.assert_allclose(mean, kept.mean(0), atol=1e-12)
    np.testing.assert_allclose(var, kept.var(0), atol=1e-12)
    both_mean, _, both = split.moments([0, 1])
    assert both == x.shape[0] * x.shape[1]
    np.testing.assert_allclose(both_mean, x.reshape(-1, 3).mean(0), atol=1e-12)


def test_large_mean_keeps_precision():
    rng = np.random.default_rng(1)
    x = 1e6 + rng.normal(size=(2000, 1, 2))
    acc = CovarianceAccumulator(2)
    for chunk in np.array_split(x, 7):
        acc.update(chunk)
    np.testing.assert_allclose(acc.covariance, np.cov(x.reshape(-1, 2).T, bias=True), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [7, 64])
def test_group_statistics_equal_numpy_on_all_activations(tiny, calib, batch_size):
    a, b = tiny("resnet", seed=0), tiny("resnet", seed=1)
    pair = prepare_pair(a, b, calib, batch_size=batch_size, tasks=["a", "b"], all_positions=True)
    x = np.load(calib)["input"]
    acts = []
    for g in pair.graphs:
        pts = g.measure_points()
        sess = ort.InferenceSession(fetch_model(g.model, [p.tensor for p in pts]).SerializeToString())
        vals = sess.run([p.tensor for p in pts], {g.inputs[0]: x})
        acts.append({p.tensor: (v, p) for p, v in zip(pts, vals)})
    for gid, gs in pair.stats.groups.items():
        rows = []
        for pa, pb in zip(pair.graphs[0].measure_points(), pair.graphs[1].measure_points()):
            if pa.gid != gid:
                continue
            va, vb = acts[0][pa.tensor][0], acts[1][pb.tensor][0]
            rows.append(np.concatenate([as_samples(va, pa.axis), as_samples(vb, pb.axis)], -1).reshape(-1, 2 * pa.size))
        allrows = np.concatenate(rows).astype(np.float64)
        np.testing.assert_allclose(gs.mean, allrows.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gs.covariance, np.cov(allrows.T, bias=True), rtol=1e-5, atol=1e-6)
        assert gs.count == allrows.shape[0]


def test_static_batch_pads_and_masks(tmp_path):
    from onnxzip.data import InputSpec

    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(10, dtype=np.float32).reshape(10, 1))
    ds = open_data(path, [InputSpec("inp", (4, 1), np.float32)])
    batches = list(ds.batches(batch_size=3))
    assert [b.feeds["inp"].shape[0] for b in batches] == [4, 4, 4]
    assert [int(b.valid.sum()) for b in batches] == [4, 4, 2]
    ds2 = open_data(path, [InputSpec("inp", (None, 1), np.float32)])
    assert sum(int(b.valid.sum()) for b in ds2.batches(batch_size=3, max_samples=5)) == 5


def test_sampled_positions_are_exact_when_positions_repeat_each_item():
    """Each item's features are the same at every position: any subset of positions gives the
    statistics of all of them."""
    rng = np.random.default_rng(3)
    items = rng.normal(2.0, 1.5, size=(50, 6)).astype(np.float32)
    # NCHW, 8x8 positions: model A's 4 channels and model B's 2
    maps = np.repeat(np.repeat(items[:, :, None, None], 8, axis=2), 8, axis=3)
    exact, sampled = CovarianceAccumulator(6), CovarianceAccumulator(6, max_positions=5, seed=7)
    for chunk in np.array_split(np.arange(50), 4):
        for acc in (exact, sampled):
            acc.update_blocks([(maps[chunk, :4], 1), (maps[chunk, 4:], 1)])
    assert exact.count == 50 * 64 and sampled.count == 50 * 5
    np.testing.assert_allclose(sampled.mean, exact.mean, rtol=1e-5)
    np.testing.assert_allclose(sampled.covariance, exact.covariance, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(exact.covariance, np.cov(items.astype(np.float64).T, bias=True), rtol=1e-4, atol=1e-6)


def test_channel_last_and_channel_first_blocks_agree():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(9, 3, 5, 4)).astype(np.float32)
    b = rng.normal(size=(9, 2, 5, 4)).astype(np.float32)
    first, last = CovarianceAccumulator(5), CovarianceAccumulator(5)
    first.update_blocks([(a, 1), (b, 1)])
    last.update_blocks([(a.transpose(0, 2, 3, 1), 3), (b.transpose(0, 2, 3, 1), -1)])
    np.testing.assert_allclose(first.covariance, last.covariance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(first.mean, last.mean, rtol=1e-6)


def test_sampled_statistics_use_fewer_positions_on_large_maps_only(tiny, calib):
    """Sampled, a group's covariance keeps at least ROWS_PER_FEATURE rows per feature for each
    measured tensor; maps with fewer positions per item than that needs are kept whole."""
    from onnxzip.stats.collect import ROWS_PER_FEATURE, max_positions

    a, b = tiny("resnet", seed=0), tiny("resnet", seed=1)
    pair = prepare_pair(a, b, calib, tasks=["a", "b"], all_positions=False)
    items = pair.stats.samples
    for gid, gs in pair.stats.groups.items():
        dim = 2 * pair.graphs[0].groups[gid].size
        cap = max_positions(dim, items, ROWS_PER_FEATURE)
        expected = 0
        for p in pair.graphs[0].measure_points():
            if p.gid == gid:
                shape = pair.graphs[0].shapes[p.tensor]
                positions = int(np.prod(shape[1:])) // shape[p.axis]
                expected += items * min(positions, cap)
                assert min(positions, cap) * items >= min(positions * items, ROWS_PER_FEATURE * dim)
        assert gs.count == expected


def test_sampled_positions_follow_the_seed(tiny, calib):
    a, b = tiny("resnet", seed=0), tiny("resnet", seed=1)
    runs = [prepare_pair(a, b, calib, tasks=["a", "b"], all_positions=False, seed=s).stats for s in (0, 0, 1)]
    first, again, other = ({gid: g.covariance for gid, g in r.groups.items()} for r in runs)
    assert all(np.array_equal(first[g], again[g]) for g in first)
    assert any(not np.array_equal(first[g], other[g]) for g in first)


def test_static_batch_model_gives_the_statistics_of_its_dynamic_twin(tiny, calib, tmp_path):
    """A fixed batch axis pads the last batch; padding rows must not reach any statistic."""
    import onnx

    def static(path, name):
        m = onnx.load(path)
        for i in m.graph.input:
            i.type.tensor_type.shape.dim[0].dim_value = 16
        for o in m.graph.output:
            o.type.tensor_type.shape.dim[0].dim_value = 16
        out = tmp_path / name
        onnx.save(m, out)
        return out

    a, b = tiny("resnet", seed=0), tiny("resnet", seed=1)
    kw = dict(batch_size=16, max_samples=90, tasks=["a", "b"], all_positions=True)  # 90 = 5 x 16 + 10
    dyn = prepare_pair(a, b, calib, **kw).stats
    fix = prepare_pair(static(a, "sa.onnx"), static(b, "sb.onnx"), calib, **kw).stats
    assert fix.samples == dyn.samples == 90
    for gid, g in dyn.groups.items():
        assert fix.groups[gid].count == g.count
        np.testing.assert_allclose(fix.groups[gid].mean, g.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fix.groups[gid].covariance, g.covariance, rtol=1e-4, atol=1e-6)
    for i, per_model in dyn.preact.items():
        for (m1, v1), (m2, v2) in zip(per_model, fix.preact[i]):
            np.testing.assert_allclose(m2, m1, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(v2, v1, rtol=1e-4, atol=1e-6)
