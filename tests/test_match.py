"""Tests of onnxzip.match: the fast zipit against a plain column-removal reference, the
baselines, invariants and parameter validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxzip.errors import OptionError
from onnxzip.matchers import (
    correlation_from_covariance,
    get_matcher,
    list_matchers,
    match,
    validate_params,
)
from onnxzip.matchers.zipit import zipit

ALPHAS = [1.0, 0.5, 0.3, 0.1, 0.01, 0.0001, 0.0, -0.5]
BETAS = [1.0, 0.25, 0.125, 0.075, 0.0375, 0.0]


# ---------------------------------------------------------------------------------------------
# Slow reference: literally the paper's loop (flat argmax over the whole matrix, merge the higher
# index into the lower, remove its row and column), with this project's stated rules for
# alpha <= 0, a zero budget, and the all -inf fallback.
# ---------------------------------------------------------------------------------------------
def reference_zipit(corr, alpha=0.3, beta=0.125, num_models=2):
    S = np.array(corr, dtype=np.float64, copy=True)
    n = S.shape[0]
    F = n // num_models
    np.fill_diagonal(S, -np.inf)
    origin = np.arange(n) // F
    merges = n - F
    budget = np.full(num_models, int((merges // num_models) * beta + 1e-4))
    if budget[0] <= 0:
        same = origin[:, None] == origin[None, :]
        S[same] = -np.inf
    P = np.eye(n)
    while S.shape[0] > F:
        m = S.shape[0]
        flat = int(np.argmax(S))  # first occurrence = lowest flat index
        r, c = divmod(flat, m)
        if S[r, c] == -np.inf:  # nothing mergeable left: the two lowest live clusters
            r, c = 0, 1
        i, j = min(r, c), max(r, c)
        if origin[i] == origin[j]:
            o = origin[i]
            budget[o] -= 1
            if budget[o] <= 0:
                sel = origin == o
                S[sel[:, None] & sel[None, :]] = -np.inf
        if alpha > 0:
            newrow = np.minimum(S[i, :], S[j, :]) * alpha
            newcol = np.minimum(S[:, i], S[:, j]) * alpha
            S[i, :] = newrow
            S[:, i] = newcol
            S[i, i] = -np.inf
        else:
            S[i, :] = -np.inf
            S[:, i] = -np.inf
        P[:, i] += P[:, j]
        P = np.delete(P, j, axis=1)
        S = np.delete(np.delete(S, j, axis=0), j, axis=1)
        origin = np.delete(origin, j)
    unmerge = P
    merge = P.T / P.sum(axis=0)[:, None]
    return merge, unmerge


def assert_same(corr, alpha, beta, num_models=2):
    m_ref, u_ref = reference_zipit(corr, alpha, beta, num_models)
    m, u = zipit(corr, alpha=alpha, beta=beta, num_models=num_models)
    assert u.dtype == np.float64 and m.dtype == np.float64
    np.testing.assert_array_equal(u, u_ref, err_msg=f"alpha={alpha} beta={beta}")
    np.testing.assert_array_equal(m, m_ref, err_msg=f"alpha={alpha} beta={beta}")
    check_invariants(m, u, corr.shape[0] // num_models)


def check_invariants(m, u, F):
    n = u.shape[0]
    assert u.shape == (n, F) and m.shape == (F, n)
    assert set(np.unique(u)) <= {0.0, 1.0}
    np.testing.assert_array_equal(u.sum(axis=1), np.ones(n))  # each feature in one cluster
    assert (u.sum(axis=0) >= 1).all()
    np.testing.assert_allclose(m @ u, np.eye(F), atol=1e-12)
    # clusters ordered by their lowest member
    first = u.argmax(axis=0)
    assert (np.diff(first) > 0).all()


def random_corr(rng, F, samples=None, structure=True):
    samples = samples or max(3 * F, 8)
    a = rng.standard_normal((F, samples))
    if structure:
        perm = rng.permutation(F)
        b = a[perm] * rng.uniform(0.2, 1.0, (F, 1)) + rng.standard_normal((F, samples))
    else:
        b = rng.standard_normal((F, samples))
    return correlation_from_covariance(np.cov(np.vstack([a, b])))


# ---------------------------------------------------------------------------------------------
# Fast == reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("F", [1, 2, 3, 5, 8, 13, 24])
def test_zipit_matches_reference_random(F):
    rng = np.random.default_rng(F)
    corrs = [random_corr(rng, F), random_corr(rng, F, structure=False)]
    for corr, alpha, beta in itertools.product(corrs, ALPHAS, BETAS):
        assert_same(corr, alpha, beta)


def adversarial_corrs(F, rng):
    n = 2 * F
    out = {}
    out["all_equal"] = np.full((n, n), 0.5)
    out["all_zero"] = np.zeros((n, n))
    out["all_negative"] = np.full((n, n), -0.25)
    q = rng.integers(-2, 3, size=(n, n)) / 2.0
    out["ties_sym"] = np.triu(q) + np.triu(q, 1).T
    out["ties_asym"] = rng.integers(-1, 2, size=(n, n)).astype(float)
    c = random_corr(rng, F)
    out["rounded"] = np.round(c, 1)
    out["negated"] = -c
    # duplicated, dead and constant features
    x = rng.standard_normal((F, 40))
    feats = np.vstack([x, x])  # B = exact copy of A: ties everywhere
    feats[F - 1] = 0.0  # dead channel
    if F > 2:
        feats[1] = 3.0  # constant channel
        feats[F + 2] = feats[F]  # duplicate within B
    out["dup_dead_const"] = correlation_from_covariance(np.cov(feats))
    # powers of two: alpha * min(.) lands exactly on other entries (alpha = .5, 1)
    h = -(2.0 ** -rng.integers(0, 4, size=(n, n)))
    out["halves_sym"] = np.triu(h) + np.triu(h, 1).T
    out["halves_mixed"] = h * rng.choice([-1.0, 1.0, 1.0], size=(n, n))
    # all negative: alpha * min(.) of a merged cluster rises and ties other entries of a row
    for k in range(3):
        g = -(2.0 ** -rng.integers(0, 3, size=(n, n)))
        out[f"neg_halves_asym{k}"] = g
        out[f"neg_halves_sym{k}"] = np.triu(g) + np.triu(g, 1).T
    out["blocks"] = np.kron(np.eye(2), np.full((F, F), 0.9)) + 0.1
    inf_mat = c.copy()
    mask = rng.random((n, n)) < 0.4
    inf_mat[mask] = -np.inf
    out["neg_inf"] = inf_mat
    pos_inf = c.copy()
    pos_inf[0, -1] = pos_inf[-1, 0] = np.inf
    out["pos_inf"] = pos_inf
    return out


@pytest.mark.parametrize("F", [1, 2, 4, 7, 10])
def test_zipit_matches_reference_adversarial(F):
    rng = np.random.default_rng(100 + F)
    for name, corr in adversarial_corrs(F, rng).items():
        for alpha, beta in itertools.product(ALPHAS, BETAS):
            try:
                assert_same(corr, alpha, beta)
            except AssertionError as exc:  # pragma: no cover - reporting only
                raise AssertionError(f"{name}: {exc}") from None


def test_zipit_matches_reference_three_models():
    rng = np.random.default_rng(7)
    for F in (1, 3, 6):
        feats = rng.standard_normal((3 * F, 30))
        corr = correlation_from_covariance(np.cov(feats))
        for alpha, beta in itertools.product([1.0, 0.3, 0.0], [1.0, 0.125, 0.0]):
            assert_same(corr, alpha, beta, num_models=3)
        assert_same(np.round(corr, 1), 0.5, 0.5, num_models=3)


@st.composite
def small_matrices(draw):
    F = draw(st.integers(1, 6))
    n = 2 * F
    levels = draw(st.sampled_from([3, 4, 8, 1000]))  # few levels -> many exact ties
    vals = draw(st.lists(st.integers(-levels, levels), min_size=n * n, max_size=n * n))
    m = np.array(vals, dtype=float).reshape(n, n) / levels
    if draw(st.booleans()):
        m = np.triu(m) + np.triu(m, 1).T
    if draw(st.integers(0, 2)) == 0:
        m = -np.abs(m)  # all negative: merged values rise, many late ties
    if draw(st.integers(0, 4)) == 0:
        k = draw(st.integers(0, n * n - 1))
        m.flat[k] = draw(st.sampled_from([np.inf, -np.inf]))
    return m


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_matrices(), st.sampled_from(ALPHAS + [2.0, 0.7]), st.sampled_from(BETAS + [0.5]))
def test_zipit_matches_reference_hypothesis(corr, alpha, beta):
    assert_same(corr, alpha, beta)


def test_zipit_larger_random_matches_reference():
    rng = np.random.default_rng(3)
    F = 64
    corr = random_corr(rng, F, samples=100)
    for alpha, beta in [(0.3, 0.125), (1.0, 1.0), (0.0, 0.0), (0.01, 0.25)]:
        assert_same(corr, alpha, beta)


def test_zipit_does_not_modify_input():
    rng = np.random.default_rng(0)
    corr = random_corr(rng, 5)
    before = corr.copy()
    match(corr, "zipit")
    zipit(corr)
    np.testing.assert_array_equal(corr, before)


def test_diagonal_is_ignored():
    rng = np.random.default_rng(1)
    corr = random_corr(rng, 6)
    other = corr.copy()
    np.fill_diagonal(other, 123.0)
    for method in ("zipit", "permute", "average"):
        for a, b in zip(match(corr, method), match(other, method)):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------
def pairing_unmerge(perm):
    """The unmerge that pairs A's feature c with B's copy of it: B feature k copies A feature
    perm[k], so cluster c = (A c, B feature k with perm[k] = c)."""
    F = len(perm)
    expected = np.zeros((2 * F, F))
    expected[np.arange(F), np.arange(F)] = 1
    expected[F + np.argsort(perm), np.arange(F)] = 1
    return expected


def permuted_copy_corr(F, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((F, 5 * F + 20))
    perm = rng.permutation(F)
    return correlation_from_covariance(np.cov(np.vstack([x, x[perm]]))), perm


@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0001, 0.0])
def test_zipit_recovers_permutation(alpha):
    F = 12
    corr, perm = permuted_copy_corr(F, 5)
    merge, unmerge = match(corr, "zipit", alpha=alpha, beta=0.0)
    expected = pairing_unmerge(perm)
    np.testing.assert_array_equal(unmerge, expected)
    np.testing.assert_array_equal(merge, expected.T / 2)


def test_permute_recovers_permutation():
    F = 12
    corr, perm = permuted_copy_corr(F, 6)
    merge, unmerge = match(corr, "permute")
    expected = pairing_unmerge(perm)
    np.testing.assert_array_equal(unmerge, expected)
    np.testing.assert_array_equal(merge, expected.T / 2)
    check_invariants(merge, unmerge, F)


def test_permute_only_cross_model_and_optimal():
    rng = np.random.default_rng(11)
    F = 7
    corr = random_corr(rng, F)
    merge, unmerge = match(corr, "permute")
    check_invariants(merge, unmerge, F)
    np.testing.assert_array_equal(unmerge[:F], np.eye(F))
    partner = unmerge[F:].argmax(axis=0)
    total = corr[np.arange(F), F + partner].sum()
    for p in itertools.islice(itertools.permutations(range(F)), 5040):
        assert corr[np.arange(F), F + np.array(p)].sum() <= total + 1e-12


def test_permute_avoids_minus_inf():
    F = 3
    corr = np.zeros((6, 6))
    corr[:F, F:] = [[5.0, -np.inf, 1.0], [-np.inf, 0.0, 0.0], [1.0, 0.0, -np.inf]]
    _, unmerge = match(corr, "permute")
    partner = unmerge[F:].argmax(axis=0)
    assert np.isfinite(corr[np.arange(F), F + partner]).all()


def test_average_is_identity_pairs():
    F = 5
    corr = random_corr(np.random.default_rng(2), F)
    merge, unmerge = match(corr, "average")
    np.testing.assert_array_equal(unmerge, np.vstack([np.eye(F), np.eye(F)]))
    np.testing.assert_array_equal(merge, np.hstack([np.eye(F), np.eye(F)]) / 2)


def test_zipit_beta_controls_within_model_merges():
    rng = np.random.default_rng(4)
    F = 16
    # within-model correlation much higher than cross-model
    a = rng.standard_normal((2, 200))
    feats = np.vstack([a[0] + 0.1 * rng.standard_normal((F, 200)),
                       a[1] + 0.1 * rng.standard_normal((F, 200))])
    corr = correlation_from_covariance(np.cov(feats))
    for beta in BETAS:
        _, u = match(corr, "zipit", beta=beta, alpha=0.3)
        budget = int((F // 2) * beta + 1e-4)
        # every merge that adds an A feature to a cluster holding one is a within-A merge
        within_a = (u[:F].sum(axis=0) - 1).clip(0).sum()
        assert within_a <= budget
        if beta == 0:
            assert within_a == 0 and (u[F:].sum(axis=0) <= 1).all()
        if beta == 1:
            assert within_a == budget  # within-model correlation dominates: budget is used


def test_zipit_f1():
    merge, unmerge = match(np.array([[1.0, -0.3], [-0.3, 1.0]]))
    np.testing.assert_array_equal(unmerge, [[1.0], [1.0]])
    np.testing.assert_array_equal(merge, [[0.5, 0.5]])


# ---------------------------------------------------------------------------------------------
# correlation_from_covariance
# ---------------------------------------------------------------------------------------------
def test_correlation_from_covariance_dead_and_constant():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 50))
    x[1] = 0.0
    x[3] = 7.0
    cov = np.cov(x)
    cov[3, 3] = -1e-18  # rounding can make a variance slightly negative
    c = correlation_from_covariance(cov)
    assert np.isfinite(c).all()
    assert (c[1] == 0).all() and (c[:, 3] == 0).all()
    live = [0, 2, 4]
    np.testing.assert_allclose(c[np.ix_(live, live)], np.corrcoef(x[live]), atol=1e-12)


def test_correlation_from_covariance_clamps():
    cov = np.array([[1e-10, 1e-10], [1e-10, 1.0]])
    c = correlation_from_covariance(cov)
    # feature 0's variance is under the clamp (near-dead): true correlation (1e-5) times
    # min(var_0, var_1) / eps
    assert c[0, 1] == pytest.approx(1e-5 * 1e-10 / 1e-7)
    assert c[0, 0] == pytest.approx(1e-10 / 1e-7)  # std product 1e-10 < eps: clamped
    live = np.array([[1.0, 0.5], [0.5, 2.0]])
    np.testing.assert_allclose(correlation_from_covariance(live)[0, 1], 0.5 / np.sqrt(2.0))  # no clamp


def test_a_near_dead_features_exact_copy_stays_its_most_similar():
    rng = np.random.default_rng(0)
    a = 1e-4 * np.maximum(rng.standard_normal(400), 2.0)  # fires rarely: tiny variance
    x = np.stack([a, a, 30 * a + 1e-6 * rng.standard_normal(400), rng.standard_normal(400)])
    c = correlation_from_covariance(np.cov(x))
    assert np.cov(x)[0, 0] < 1e-7 * np.cov(x).diagonal().max()  # under the clamp
    assert c[0, 1] > c[0, 2] > 0  # the exact copy, then the louder near-copy


def test_correlation_from_covariance_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        correlation_from_covariance(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN/inf"):
        correlation_from_covariance(np.array([[1.0, np.nan], [np.nan, 1.0]]))


# ---------------------------------------------------------------------------------------------
# Registry and validation
# ---------------------------------------------------------------------------------------------
def test_registry_lists_builtins():
    names = [m.name for m in list_matchers()]
    assert names == sorted(names)
    assert {"zipit", "permute", "average"} <= set(names)
    z = get_matcher("ZipIt")
    assert z.name == "zipit" and "ICLR 2024" in z.reference and z.description
    assert z.defaults == {"alpha": 0.3, "beta": 0.125, "num_models": 2}
    assert z.param("beta").range_text == "[0, 1]"


def test_unknown_method():
    with pytest.raises(OptionError, match="unknown matching method 'zipitt': choose one of .*average.*permute.*zipit"):
        match(np.eye(4), "zipitt")


def test_validate_params():
    assert validate_params("zipit", {}) == {"alpha": 0.3, "beta": 0.125, "num_models": 2}
    assert validate_params("zipit", {"alpha": "0.5", "beta": 1}) == {
        "alpha": 0.5, "beta": 1.0, "num_models": 2}
    assert validate_params("permute", {}) == {}
    with pytest.raises(OptionError, match=r"^beta=1\.5 is out of range for zipit: must be in \[0, 1\]$"):
        validate_params("zipit", {"beta": 1.5})
    with pytest.raises(OptionError, match="beta=-0.1 is out of range"):
        match(np.eye(4), beta=-0.1)
    with pytest.raises(OptionError, match="unknown parameter 'gamma' for zipit: its parameters are alpha, beta, num_models"):
        match(np.eye(4), gamma=1)
    with pytest.raises(OptionError, match="unknown parameter 'alpha' for permute"):
        match(np.eye(4), "permute", alpha=1)
    with pytest.raises(OptionError, match="not a number"):
        validate_params("zipit", {"alpha": "abc"})
    with pytest.raises(OptionError, match="finite"):
        validate_params("zipit", {"alpha": float("nan")})
    with pytest.raises(OptionError, match="boolean"):
        validate_params("zipit", {"alpha": True})
    with pytest.raises(OptionError, match="not an integer"):
        validate_params("zipit", {"num_models": 2.5})
    with pytest.raises(OptionError, match="num_models=1 is out of range for zipit: must be >= 2"):
        validate_params("zipit", {"num_models": 1})
    with pytest.raises(OptionError, match=r"alpha=7 is out of range for zipit: must be in \[0, 1\]"):
        validate_params("zipit", {"alpha": 7})
    with pytest.raises(OptionError, match="alpha=-3 is out of range"):
        validate_params("zipit", {"alpha": -3})
    assert validate_params("zipit", {"alpha": "1"})["alpha"] == 1.0


def test_error_messages_are_one_line():
    for call in (lambda: match(np.eye(4), "nope"), lambda: match(np.eye(4), beta=2),
                 lambda: match(np.eye(4), foo=1)):
        with pytest.raises(OptionError) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad, what", [
    (np.zeros((3, 3)), "multiple of 2"),
    (np.zeros((2, 4)), "square"),
    (np.zeros((0, 0)), "positive multiple"),
    (np.zeros(4), "square"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN"),
])
def test_bad_matrix(bad, what):
    for method in ("zipit", "permute", "average"):
        with pytest.raises(ValueError, match=what):
            match(bad, method)


def test_three_models_through_facade():
    rng = np.random.default_rng(9)
    corr = correlation_from_covariance(np.cov(rng.standard_normal((9, 40))))
    merge, unmerge = match(corr, "zipit", num_models=3, beta=0.5)
    check_invariants(merge, unmerge, 3)
    with pytest.raises(ValueError, match="multiple of 3"):
        match(np.eye(8), num_models=3)


def test_register_rejects_duplicates():
    from onnxzip.matchers.registry import register

    with pytest.raises(ValueError, match="already registered"):
        register("zipit", reference="x", description="y")(lambda c: None)
