"""Convolutional families beyond plain Conv stacks: grouped convolutions (block-restricted
matching), channel split and shuffle, BatchNorm over a growing Concat; and exact self-zips with
constant and near-duplicate features."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.graph.build import partition
from onnxzip.matchers import match, match_within_blocks
from onnxzip.merge import similarity
from onnxzip.permutation import permute_model, random_permutations
from onnxzip.pipeline import load_layer_graph
from onnxzip.stats.collect import GroupStats
from tests.onnx_builders import cnn_family, strided_pool_head
from tests.tiny_models import images

KINDS = ["grouped", "shuffle", "dense"]


def run(model, x):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for kind in KINDS:
        paths[kind] = root / f"{kind}.onnx"
        onnx.save(cnn_family(kind), paths[kind])
    return paths


@pytest.fixture(scope="module")
def calib8(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=images(64, seed=1))
    return path


def _random_corr(f, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 2 * f)) @ rng.standard_normal((2 * f, 2 * f))
    return np.corrcoef(x.T)


@pytest.mark.parametrize("method,params", [("zipit", {"alpha": 0.3, "beta": 0.5}), ("zipit", {"beta": 0.0}),
                                           ("permute", {}), ("average", {})])
def test_block_restricted_matching_is_the_matcher_on_each_block(method, params):
    f = 10
    corr = _random_corr(f, 3)
    blocks = ((0, 3, 4, 9), (1, 2), (5, 6, 7, 8))
    merge, unmerge = match_within_blocks(corr, blocks, method=method, **params)
    assert merge.shape == (f, 2 * f) and unmerge.shape == (2 * f, f)
    np.testing.assert_allclose(merge @ unmerge, np.eye(f), atol=1e-12)
    for b in blocks:
        b = np.asarray(b)
        idx = np.concatenate([b, f + b])
        m, u = match(corr[np.ix_(idx, idx)], method=method, **params)
        np.testing.assert_array_equal(merge[np.ix_(b, idx)], m)
        np.testing.assert_array_equal(unmerge[np.ix_(idx, b)], u)
        # nothing crosses a block: zero outside the block's rows and columns
        rest = np.setdiff1d(np.arange(2 * f), idx)
        assert not merge[np.ix_(b, rest)].any() and not unmerge[np.ix_(rest, b)].any()
    # no blocks: the plain matcher
    m0, u0 = match_within_blocks(corr, (), method=method, **params)
    m1, u1 = match(corr, method=method, **params)
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_array_equal(u0, u1)


def test_blocks_must_partition_the_features():
    with pytest.raises(ValueError, match="partition"):
        match_within_blocks(_random_corr(4, 0), ((0, 1), (1, 2, 3)), method="permute")


def test_partition_is_the_coarsest_one_keeping_every_piece_apart():
    assert partition(6, []) == ()
    assert partition(6, [{0, 1, 2}]) == ((0, 1, 2), (3, 4, 5))
    assert partition(6, [{0, 1, 2}, {2, 3}]) == ((0, 1), (2,), (3,), (4, 5))
    assert partition(4, [{0, 2}]) == ((0, 2), (1, 3))
    assert partition(4, [set(range(4))]) == ()


def test_grouped_conv_and_channel_split_record_blocks(family):
    g = load_layer_graph(family["grouped"])
    assert g.max_depth() == g.num_layers and not g.unsupported
    grouped = [l for l in g.layers if l.group > 1 and not l.per_channel]
    assert [l.group for l in grouped] == [4, 2]
    for layer in grouped:
        n_in = layer.in_channels // layer.group
        blocks = g.groups[layer.in_space.gid].blocks
        # every block lies inside one of the conv's input blocks
        assert blocks and all(len({c // n_in for c in b}) == 1 for b in blocks)
        assert g.groups[layer.out_space.gid].blocks
    s = load_layer_graph(family["shuffle"])
    assert s.max_depth() == s.num_layers and not s.unsupported
    assert any(n.op_type == "Gather" for n in s.model.graph.node)  # the shuffle, normalized
    assert not any(n.op_type == "Transpose" for n in s.model.graph.node)
    assert any(g.blocks for g in s.groups.values())
    d = load_layer_graph(family["dense"])
    assert d.max_depth() == d.num_layers and not d.unsupported
    assert any(p.op_type == "BatchNormalization" and p.space is not None for p in d.params)


@pytest.mark.parametrize("kind", KINDS)
def test_permuting_every_group_preserves_outputs(family, kind):
    g = load_layer_graph(family[kind])
    perms = random_permutations(g, seed=3)
    for gid, group in g.groups.items():
        for block in group.blocks:  # channels stay inside their blocks
            assert set(perms[gid][list(block)]) == set(block)
    x = images(16, seed=5)
    np.testing.assert_allclose(run(permute_model(g, perms), x)[0], run(family[kind], x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,params", [("zipit", {"beta": 0.0}), ("permute", {})])
def test_zip_with_permuted_self_gives_the_model_back(family, calib8, tmp_path, kind, method, params):
    g = load_layer_graph(family[kind])
    other = tmp_path / "permuted.onnx"
    onnx.save(permute_model(g, random_permutations(g, seed=7)), other)
    x = images(16, seed=8)
    want = run(family[kind], x)[0]
    for repair, refit in ((False, False), (True, False), (True, True)):
        result = onnxzip.zip_models(family[kind], other, calib8, method=method, params=params, stop_at="all",
                                    do_repair=repair, refit=refit, tasks=["a", "b"])
        for got in run(result.model, x):
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_pair_of_different_models_zips_at_full_depth(family, calib8, tmp_path, kind):
    other = tmp_path / "other.onnx"
    onnx.save(cnn_family(kind, seed=1), other)
    m = load_layer_graph(family[kind]).num_layers
    for stop_at, heads in (("all", 1), (m - 1, 2)):  # everything shared; all but the heads
        result = onnxzip.zip_models(family[kind], other, calib8, method="zipit", params={"alpha": 0.3, "beta": 0.5},
                                    stop_at=stop_at, tasks=["a", "b"])
        assert result.stop_at == (m if stop_at == "all" else stop_at)
        outs = run(result.model, images(8, seed=2))
        assert len(outs) == heads and all(np.isfinite(o).all() and o.shape == (8, 5) for o in outs)


def _stats(samples):
    x = np.asarray(samples, dtype=np.float64)
    return GroupStats(x.mean(axis=0), np.cov(x.T, bias=True), float(len(x)))


def test_constant_features_pair_with_their_twins_by_their_keys():
    rng = np.random.default_rng(0)
    live = rng.standard_normal((500, 2))
    dead = np.zeros((500, 3))  # a ReLU that never fires, three times
    a = np.hstack([live, dead])
    stats = _stats(np.hstack([a, a]))
    keys = np.tile(np.array([[0.5, 1.0], [0.2, 1.0], [-1.0, 0.1], [-2.0, 0.3], [-0.5, 0.2]]), (2, 1))
    # without keys, nothing tells the constant features apart: their similarities are all equal
    plain = similarity(stats)
    assert np.ptp(plain[np.ix_([2, 3, 4], [7, 8, 9])]) == 0
    sim = similarity(stats, keys)
    # (with beta > 0 zipit may first merge two live features of one model whose correlation
    # beats a constant pair's 0: the paper's similarity, kept)
    for method, params in (("zipit", {"beta": 0.0}), ("permute", {})):
        _, u = match(sim, method=method, **params)
        np.testing.assert_array_equal(u[:5], u[5:])  # each feature with its twin


def test_a_group_constant_on_the_data_pairs_features_by_their_values():
    """Every feature of a group constant up to rounding (a deep layer whose output no longer depends
    on the input): two exports of the same network differ there by rounding only, so the
    correlations are noise; each feature pairs with its twin by its value."""
    rng = np.random.default_rng(2)
    values = rng.uniform(0.1, 0.9, 6)
    a = values + 1e-9 * rng.standard_normal((300, 6))
    b = values + 1e-9 * rng.standard_normal((300, 6))  # the other export's rounding
    sim = similarity(_stats(np.hstack([a, b])))
    for method, params in (("zipit", {"beta": 0.0}), ("permute", {})):
        _, u = match(sim, method=method, **params)
        np.testing.assert_array_equal(u[:6], u[6:])


def test_near_copies_do_not_beat_exact_copies():
    """Rounding makes a near-copy's correlation exceed the exact copy's; the tie-breaks decide."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal(1000)
    a = np.stack([base, 1.01 * base + 1e-4 * rng.standard_normal(1000), rng.standard_normal(1000)], axis=1)
    stats = _stats(np.hstack([a, a]))
    cov = stats.covariance.copy()
    cov[0, 4] = cov[4, 0] = cov[0, 4] * (1 + 3e-6)  # rounding: the near-copy looks better than the twin
    cov[1, 3] = cov[3, 1] = cov[1, 3] * (1 - 3e-6)
    noisy = GroupStats(stats.mean, cov, stats.count)
    _, u = match(similarity(noisy), method="zipit", beta=0.0)
    np.testing.assert_array_equal(u[:3], u[3:])


def test_a_pooled_as_strided_view_with_a_static_batch_zips_at_full_depth(calib8, tmp_path):
    # Reshape [B, C, 1, 1] -> [B*C], Gather of every entry (constant indices [B, C, 1, 1]): the
    # Gather becomes a Reshape and the channels come back out of the flattened axis
    path = tmp_path / "strided.onnx"
    onnx.save(strided_pool_head(), path)
    graph = load_layer_graph(path)
    assert any("identity as_strided" in n for n in graph.notes)
    assert graph.max_depth() == graph.num_layers == 3, [u.reason for u in graph.unsupported]
    other = tmp_path / "permuted.onnx"
    onnx.save(permute_model(graph, random_permutations(graph, seed=4)), other)
    x = images(4, seed=8)
    want = run(path, x)[0]
    np.testing.assert_allclose(run(other, x)[0], want, atol=1e-5, rtol=1e-5)
    for refit in (False, True):
        result = onnxzip.zip_models(path, other, calib8, method="zipit", params={"beta": 0.0}, stop_at="all",
                                    do_repair=True, refit=refit, tasks=["a", "b"])
        for got in run(result.model, x):
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
