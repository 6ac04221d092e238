"""Tests of the distribution metrics (FID, KID, precision/recall, density/coverage, the memorisation
audit), of their streaming versions and of their half-sample intervals, against closed forms,
brute-force numpy computations and hand-worked examples on small feature arrays."""

import contextlib
import math

import numpy as np
import pytest
import torch

from medfusion.metrics.distribution import (
    KID,
    FeatureStatistics,
    Interval,
    as_features,
    bootstrap_interval,
    bootstrap_intervals,
    density_coverage,
    feature_statistics,
    fid,
    frechet_distance,
    kid,
    memorisation_audit,
    nearest_neighbours,
    precision_recall,
)
from medfusion.metrics.streaming import FeatureStatisticsMetric, StreamingFID


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _spd(d: int, seed: int) -> np.ndarray:
    """A random symmetric positive-definite ``(d, d)`` covariance."""
    a = _rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _stats(mean: np.ndarray, cov: np.ndarray) -> FeatureStatistics:
    return FeatureStatistics(torch.from_numpy(mean), torch.from_numpy(cov), 1000)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr((S1 S2)^½)``, independently of the library: scipy's sqrtm, or the eigenvalues of S1 S2."""
    try:
        import scipy.linalg
    except ImportError:
        eigenvalues = np.linalg.eigvals(s1 @ s2)
        return float(np.sqrt(np.clip(eigenvalues.real, 0, None)).sum())
    return float(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


def _gaussian_frechet(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))


def _two_modes(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Real features in two far-apart unit Gaussian clusters; fake features only in the second."""
    rng = _rng(seed)
    offset = np.zeros(d)
    offset[0] = 20.0
    real = np.concatenate([rng.normal(size=(n, d)) - offset, rng.normal(size=(n, d)) + offset])
    fake = rng.normal(size=(n, d)) + offset
    return real, fake


# --------------------------------------------------------------------------------------------- FID


def test_as_features_converts_to_float64_and_rejects_bad_input():
    x = as_features(np.ones((3, 2), dtype=np.float32))
    assert x.dtype == torch.float64 and x.shape == (3, 2)
    assert as_features(torch.ones(3, 2, dtype=torch.float16)).dtype == torch.float64
    for bad in (np.ones(4), np.ones((2, 3, 4)), np.ones((0, 3)), np.ones((3, 0))):
        with pytest.raises(ValueError, match=r"my features must be an \(N, D\) array"):
            as_features(bad, "my features")


def test_feature_statistics_match_numpy():
    x = _rng().normal(size=(50, 6)) * np.arange(1, 7) + np.arange(6)
    stats = feature_statistics(x)
    assert stats.n == 50
    assert stats.mean.dtype == stats.cov.dtype == torch.float64
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-12, atol=1e-12)
    # float32 torch input: computed in float64 from the float32 values
    x32 = torch.from_numpy(x).float()
    np.testing.assert_allclose(
        feature_statistics(x32).cov.numpy(), np.cov(x32.double().numpy(), rowvar=False), rtol=1e-12
    )


def test_feature_statistics_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        feature_statistics(np.ones((1, 4)))


def test_fid_of_identical_sets_is_zero():
    x = _rng().normal(size=(200, 16))
    assert abs(fid(x, x)) < 1e-6
    assert abs(fid(x, x.copy())) < 1e-6
    # also with a rank-deficient covariance (fewer vectors than dimensions)
    few = _rng(1).normal(size=(8, 32))
    assert abs(fid(few, few)) < 1e-6


def test_frechet_distance_diagonal_covariances_closed_form():
    m1, m2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = ((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    value = frechet_distance(_stats(m1, np.diag(s1)), _stats(m2, np.diag(s2)))
    assert value == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(6.0 + (4.0 + 1.0 + 0.0 + 0.5))  # hand-worked: means, then variances


def test_frechet_distance_full_covariances_matches_independent_computation():
    d = 10
    s1, s2 = _spd(d, 1), _spd(d, 2)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # the two covariances do not commute
    m1, m2 = _rng(3).normal(size=d), _rng(4).normal(size=d)
    expected = _gaussian_frechet(m1, s1, m2, s2)
    value = frechet_distance(_stats(m1, s1), _stats(m2, s2))
    assert value == pytest.approx(expected, rel=1e-8)
    # the eigenvalue route of the fallback agrees with scipy too (checks the test's own reference)
    eigenvalues = np.linalg.eigvals(s1 @ s2)
    assert np.abs(eigenvalues.imag).max() < 1e-10 and eigenvalues.real.min() > 0
    assert np.sqrt(eigenvalues.real).sum() == pytest.approx(_trace_sqrt_product(s1, s2), rel=1e-10)


def test_frechet_distance_is_symmetric():
    d = 7
    a = _stats(_rng(5).normal(size=d), _spd(d, 5))
    b = _stats(_rng(6).normal(size=d), _spd(d, 6))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    x, y = _rng(7).normal(size=(100, d)), _rng(8).normal(size=(80, d)) * 2
    assert fid(x, y) == pytest.approx(fid(y, x), rel=1e-10)


def test_fid_of_gaussian_samples_approaches_closed_form():
    d, n = 8, 20000
    m1, m2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = _spd(d, 11), _spd(d, 12)
    expected = _gaussian_frechet(m1, s1, m2, s2)
    rng = _rng(13)
    x = rng.multivariate_normal(m1, s1, size=n)
    y = rng.multivariate_normal(m2, s2, size=n)
    # over 20 seeds the sampling error had mean 0.014 (FID's positive bias) and std 0.037, max 0.085
    assert fid(x, y) == pytest.approx(expected, abs=0.2)
    assert expected > 2.0  # the tolerance is small next to the value


def test_mean_shift_changes_only_the_mean_term():
    x = _rng(20).normal(size=(300, 5))
    y = _rng(21).normal(size=(300, 5)) * 1.5
    shift = np.array([1.0, -2.0, 0.0, 0.5, 3.0])
    gap = x.mean(0) - y.mean(0)
    expected_change = ((gap - shift) ** 2).sum() - (gap**2).sum()
    assert fid(x, y + shift) - fid(x, y) == pytest.approx(expected_change, rel=1e-8)
    # a shift of both sets changes nothing
    assert fid(x + shift, y + shift) == pytest.approx(fid(x, y), rel=1e-8)


def test_fid_rejects_bad_input():
    x = _rng().normal(size=(20, 4))
    with pytest.raises(ValueError, match="different widths"):
        fid(x, _rng().normal(size=(20, 5)))
    with pytest.raises(ValueError, match="different widths"):
        frechet_distance(feature_statistics(x), feature_statistics(x[:, :3]))
    nan = x.copy()
    nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fid(x, nan)
    inf = x.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        fid(inf, x)
    with pytest.raises(ValueError, match=r"\(N, D\) array"):
        fid(x, x[:, 0])
    with pytest.raises(ValueError, match=r"\(N, D\) array"):
        fid(x[None], x)


# --------------------------------------------------------------------------------------------- KID


def _mmd2(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """MMD² with the kernel ``(x·y / D + 1)^3``; the V-statistic keeps the within-set diagonals."""
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    if not unbiased:
        return float(k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())
    m, n = len(x), len(y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def test_kid_on_whole_sets_equals_unbiased_mmd2():
    x, y = _rng(30).normal(size=(40, 6)), _rng(31).normal(size=(40, 6)) + 0.3
    result = kid(x, y, subsets=1, subset_size=40)  # one subset of everything: a permutation of each set
    assert isinstance(result, KID)
    assert result.mean == pytest.approx(_mmd2(x, y, unbiased=True), rel=1e-10)
    assert (result.std, result.subsets, result.subset_size) == (0.0, 1, 40)


def test_kid_is_unbiased_where_the_v_statistic_is_not():
    repeats, n, d = 400, 32, 4
    rng = _rng(32)
    unbiased, biased = [], []
    for seed in range(repeats):
        x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))  # the same distribution
        unbiased.append(kid(x, y, subsets=1, subset_size=n, seed=seed).mean)
        biased.append(_mmd2(x, y, unbiased=False))
    unbiased, biased = np.array(unbiased), np.array(biased)
    standard_error = unbiased.std(ddof=1) / math.sqrt(repeats)
    assert abs(unbiased.mean()) < 4 * standard_error
    assert biased.mean() > 20 * standard_error and biased.mean() > 0.3  # measured: ~0.63
    assert (biased > unbiased).all()  # the diagonals (k(x, x) > 0) always push the V-statistic up


def test_kid_of_different_distributions_is_clearly_positive():
    x = _rng(33).normal(size=(200, 4))
    y = _rng(34).normal(size=(200, 4)) + 0.5
    same = kid(x, _rng(35).normal(size=(200, 4)), subsets=10, subset_size=100)
    different = kid(x, y, subsets=10, subset_size=100)
    assert different.std > 0 and same.std > 0
    assert different.mean - 3 * different.std > 0  # measured: 1.48 +- 0.30
    assert different.mean > 10 * abs(same.mean)


def test_kid_subsets_and_subset_size():
    x, y = _rng(36).normal(size=(50, 3)), _rng(37).normal(size=(30, 3))
    result = kid(x, y, subsets=5, subset_size=1000)
    assert result.subset_size == 30 and result.subsets == 5
    assert result.std > 0
    assert kid(x, y, subsets=1, subset_size=10).std == 0.0
    with pytest.raises(ValueError, match="subset_size >= 2"):
        kid(x, y, subset_size=1)
    with pytest.raises(ValueError, match="subset_size >= 2"):
        kid(x, y[:1])  # capped at the smaller set: one vector
    with pytest.raises(ValueError, match="subsets >= 1"):
        kid(x, y, subsets=0)
    with pytest.raises(ValueError, match="different widths"):
        kid(x, y[:, :2])


def test_kid_is_deterministic_per_seed():
    x, y = _rng(38).normal(size=(60, 4)), _rng(39).normal(size=(60, 4)) + 0.2
    first = kid(x, y, subsets=8, subset_size=20, seed=3)
    assert kid(x, y, subsets=8, subset_size=20, seed=3) == first
    assert kid(torch.from_numpy(x), torch.from_numpy(y), subsets=8, subset_size=20, seed=3) == first
    assert kid(x, y, subsets=8, subset_size=20, seed=4).mean != first.mean


# -------------------------------------------------------------------------------- precision/recall


def test_hand_worked_one_dimensional_example():
    # k = 1: real radii are 1, 1, 1, 1, 7 (the last point's neighbour is 3); fake radii 4.5, 4.5, 15
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[0.5], [5.0], [20.0]])
    pr = precision_recall(real, fake, k=1)
    # 0.5 is in the balls of 0 and 1, 5 in the ball of 10, 20 in none
    assert pr.precision == pytest.approx(2 / 3) and pr.k == 1
    # 0..3 lie within 4.5 of 0.5, 10 within 15 of 20
    assert pr.recall == pytest.approx(1.0)
    dc = density_coverage(real, fake, k=1)
    assert dc.density == pytest.approx((2 + 1 + 0) / 3) and dc.k == 1
    assert dc.coverage == pytest.approx(3 / 5)  # the balls of 0, 1 and 10 hold a fake point


def test_precision_recall_of_identical_sets_is_one():
    x = _rng(40).normal(size=(120, 5))
    assert precision_recall(x, x) == precision_recall(x, x.copy())
    result = precision_recall(x, x)
    assert (result.precision, result.recall, result.k) == (1.0, 1.0, 3)


def test_precision_recall_of_far_apart_sets_is_zero():
    x = _rng(41).normal(size=(100, 5))
    y = _rng(42).normal(size=(80, 5)) + 100
    result = precision_recall(x, y)
    assert (result.precision, result.recall) == (0.0, 0.0)


def test_mode_dropping_keeps_precision_and_halves_recall():
    real, fake = _two_modes(150, 4, seed=43)
    result = precision_recall(real, fake)
    assert result.precision > 0.85  # measured 0.93: every fake sample is realistic
    # the first mode (half of the real samples) lies far outside every fake ball
    assert 0.4 < result.recall <= 0.5


def test_precision_recall_does_not_depend_on_block_size():
    real, fake = _rng(44).normal(size=(90, 4)), _rng(45).normal(size=(70, 4)) * 1.2
    reference = precision_recall(real, fake, block_size=1024)
    assert 0 < reference.precision < 1 and 0 < reference.recall < 1  # not a trivial case
    for block_size in (1, 7):
        assert precision_recall(real, fake, block_size=block_size) == reference


def test_precision_recall_rejects_bad_input():
    x = _rng(46).normal(size=(10, 3))
    with pytest.raises(ValueError, match="k=3 need more than 3"):
        precision_recall(x, x[:3])
    with pytest.raises(ValueError, match="k=10 need more than 10"):
        precision_recall(x, x, k=10)
    with pytest.raises(ValueError, match="different widths"):
        precision_recall(x, x[:, :2])


# ------------------------------------------------------------------------------- density/coverage


def test_density_coverage_of_identical_sets():
    x = _rng(47).normal(size=(20, 3))
    result = density_coverage(x, x)
    assert result.coverage == 1.0 and result.k == 5
    # every ball holds its centre and its k neighbours: density (k + 1) / k exactly, without ties.
    # (small set on purpose: see the report on ties at the ball boundary in larger sets)
    assert result.density == pytest.approx(6 / 5)


def test_density_coverage_of_far_apart_sets_is_zero():
    x = _rng(48).normal(size=(60, 4))
    result = density_coverage(x, x + 100)
    assert (result.density, result.coverage) == (0.0, 0.0)


def test_mode_dropping_halves_coverage():
    real, fake = _two_modes(150, 4, seed=49)
    result = density_coverage(real, fake)
    assert 0.4 < result.coverage <= 0.5  # measured 0.47
    # the fake samples are as dense as the real ones in the mode they cover: density ~ 1 (measured 0.99)
    assert 0.7 < result.density < 1.3


def test_density_coverage_does_not_depend_on_block_size():
    real, fake = _rng(50).normal(size=(90, 4)), _rng(51).normal(size=(70, 4)) * 1.2
    reference = density_coverage(real, fake, block_size=1024)
    assert 0 < reference.coverage < 1 and reference.density > 0
    for block_size in (1, 7):
        assert density_coverage(real, fake, block_size=block_size) == reference


def test_density_coverage_rejects_bad_input():
    x = _rng(52).normal(size=(5, 3))
    with pytest.raises(ValueError, match="k=5 need more than 5"):
        density_coverage(x, x)
    with pytest.raises(ValueError, match="different widths"):
        density_coverage(np.ones((10, 3)), np.ones((10, 4)))


# ---------------------------------------------------------------------------------- memorisation


@pytest.mark.parametrize("block_size", [1024, 7])
def test_nearest_neighbours_match_brute_force(block_size):
    queries, references = _rng(60).normal(size=(40, 6)), _rng(61).normal(size=(90, 6))
    distances, indices = nearest_neighbours(queries, references, block_size=block_size)
    brute = np.sqrt(((queries[:, None, :] - references[None, :, :]) ** 2).sum(-1))
    assert distances.shape == indices.shape == (40,)
    np.testing.assert_array_equal(indices.numpy(), brute.argmin(1))
    np.testing.assert_allclose(distances.numpy(), brute.min(1), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="different widths"):
        nearest_neighbours(queries, references[:, :5])


def test_memorisation_audit_flags_a_copied_training_sample():
    d = 8
    train = _rng(62).normal(size=(400, d))
    heldout = _rng(63).normal(size=(300, d))
    fake = _rng(64).normal(size=(300, d))  # fresh samples of the training distribution
    fake[17] = train[42]  # ... and one exact copy
    audit = memorisation_audit(train, fake, heldout, quantile=0.05, top=5)

    assert 17 in audit.flagged.tolist()
    assert int(audit.fake_nearest[17]) == 42
    assert float(audit.fake_to_train[17]) < 1e-6
    index, train_index, distance = audit.closest[0]
    assert (index, train_index) == (17, 42) and distance < 1e-6

    # fresh samples are flagged about as often as held-out ones: ~ the quantile
    assert abs(audit.fraction_flagged - 0.05) < 0.05
    assert audit.fraction_flagged == pytest.approx(len(audit.flagged) / len(fake))
    assert audit.quantile == 0.05

    # the closest pairs, closest first, with the distances of fake_to_train
    assert len(audit.closest) == 5
    assert [c[2] for c in audit.closest] == sorted(c[2] for c in audit.closest)
    for i, j, dist in audit.closest:
        assert int(audit.fake_nearest[i]) == j and float(audit.fake_to_train[i]) == dist
    assert len(memorisation_audit(train, fake[:3], heldout, top=8).closest) == 3


def test_memorisation_threshold_is_the_heldout_quantile():
    train, heldout, fake = (_rng(seed).normal(size=(n, 5)) for seed, n in ((65, 100), (66, 50), (67, 30)))
    audit = memorisation_audit(train, fake, heldout, quantile=0.1)
    heldout_to_train = np.sqrt(((heldout[:, None] - train[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(audit.heldout_to_train.numpy(), heldout_to_train, rtol=1e-9)
    assert audit.threshold == pytest.approx(np.quantile(heldout_to_train, 0.1), rel=1e-9)
    flagged = np.nonzero(audit.fake_to_train.numpy() < audit.threshold)[0]
    np.testing.assert_array_equal(audit.flagged.numpy(), flagged)


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.1, 1.5])
def test_memorisation_audit_rejects_quantile_outside_unit_interval(quantile):
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="quantile must be in"):
        memorisation_audit(x, x, x, quantile=quantile)


# ------------------------------------------------------------------------------------- streaming


def test_feature_statistics_metric_over_uneven_batches():
    x = torch.from_numpy(_rng(70).normal(size=(100, 6)) * 3 + 5)
    metric = FeatureStatisticsMetric(6)
    for batch in x.split([1, 7, 30, 62]):
        metric.update(batch)
    mean, cov = metric.compute()
    expected = feature_statistics(x)
    torch.testing.assert_close(mean, expected.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, expected.cov, rtol=1e-10, atol=1e-10)
    stats = metric.statistics()
    assert stats.n == 100
    torch.testing.assert_close(stats.cov, expected.cov, rtol=1e-10, atol=1e-10)


def test_feature_statistics_metric_rejects_bad_input():
    with pytest.raises(ValueError, match="num_features must be >= 1"):
        FeatureStatisticsMetric(0)
    metric = FeatureStatisticsMetric(4)
    with pytest.raises(ValueError, match="width 4; got 3"):
        metric.update(torch.ones(5, 3))
    metric.update(torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        metric.compute()


def test_streaming_fid_equals_fid_and_resets():
    real = torch.from_numpy(_rng(71).normal(size=(120, 5)))
    fake = torch.from_numpy(_rng(72).normal(size=(90, 5)) * 1.3 + 0.4)
    metric = StreamingFID(5)
    for batch in real.split(50):
        metric.update(batch, real=True)
    for batch in fake.split(40):
        metric.update(batch, real=False)
    value = metric.compute()
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(fid(real, fake), rel=1e-9)

    metric.reset()
    assert int(metric.real.count) == int(metric.fake.count) == 0
    other_real, other_fake = real[:60] * 2, fake[:45] - 1
    metric.update(other_real, real=True)
    metric.update(other_fake, real=False)
    assert float(metric.compute()) == pytest.approx(fid(other_real, other_fake), rel=1e-9)

    with pytest.raises(ValueError, match="width 5"):
        metric.update(torch.ones(3, 4), real=True)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
def test_streaming_fid_forward_keeps_accumulated_state():
    real = torch.from_numpy(_rng(73).normal(size=(100, 4)))
    fake = torch.from_numpy(_rng(74).normal(size=(100, 4)) + 1)
    metric = StreamingFID(4)
    metric.update(real[:50], real=True)
    metric.update(fake, real=False)
    with contextlib.suppress(ValueError):  # the batch value alone has no fake statistics
        metric(real[50:], real=True)  # forward: update plus a batch value
    assert float(metric.compute()) == pytest.approx(fid(real, fake), rel=1e-9)


def test_exact_copies_on_a_ball_edge_count_inside_whatever_the_block_size():
    """A synthetic set holding exact copies of real features: every copy lies on the edge of the
    balls whose k-th neighbour it copies; all are inside, so density is exactly (k + 1) / k for
    the identical set, for every block size (matrix-product distances round differently)."""
    x = _rng(5).normal(size=(300, 4))
    values = {b: density_coverage(x, x, block_size=b) for b in (1, 7, 64, 1024)}
    for result in values.values():
        assert result.density == pytest.approx(1.2, abs=1e-12) and result.coverage == 1.0
    assert {precision_recall(x, x[:100], block_size=b).precision for b in (1, 7, 1024)} == {1.0}


def test_fid_of_small_sets_from_their_rows_equals_the_covariance_route():
    """Fewer vectors than dimensions: FID from the rows (an (N, N) problem) is the covariance
    route's value, for uneven sizes, and 0 for identical sets. (The rows give 254.748321731783, as
    a 40-digit mpmath computation does; the covariances' rank-deficient square roots add ~1e-8.)"""
    x = _rng(80).normal(size=(30, 64)) * 2 + 1
    y = _rng(81).normal(size=(45, 64))
    expected = frechet_distance(feature_statistics(x), feature_statistics(y))
    assert fid(x, y) == pytest.approx(expected, rel=1e-7)
    assert fid(x, y) == pytest.approx(254.748321731783, rel=1e-12)
    assert fid(y, x) == pytest.approx(fid(x, y), rel=1e-12)
    assert abs(fid(x, x)) < 1e-9


# --------------------------------------------------------------------------------------- intervals


def _pr(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    result = precision_recall(real, fake)
    return {"precision": result.precision, "recall": result.recall}


def test_bootstrap_interval_is_deterministic_per_seed_and_holds_the_estimate():
    x, y = _rng(90).normal(size=(80, 4)), _rng(91).normal(size=(60, 4)) + 0.3
    first = bootstrap_interval(fid, x, y, n_resamples=50, seed=3, bounds=(0.0, math.inf))
    assert isinstance(first, Interval) and first.level == 0.9 and first.resamples == 50
    assert first == bootstrap_interval(fid, x, y, n_resamples=50, seed=3, bounds=(0.0, math.inf))
    assert first != bootstrap_interval(fid, x, y, n_resamples=50, seed=4, bounds=(0.0, math.inf))
    assert 0.0 <= first.low < fid(x, y) < first.high  # the median of the half-samples sits on it
    wider = bootstrap_interval(fid, x, y, n_resamples=50, seed=3, level=0.98)
    assert wider.low <= first.low and wider.high >= first.high
    # k-NN metrics too (drawn with replacement, duplicates would pull them below the estimate)
    intervals = bootstrap_intervals(_pr, x, y, n_resamples=50, seed=3)
    estimate = _pr(torch.from_numpy(x), torch.from_numpy(y))
    for key in ("precision", "recall"):
        assert estimate[key] in intervals[key] and 0.0 <= intervals[key].low <= intervals[key].high <= 1.0


def test_bootstrap_fid_interval_holds_the_frechet_distance_of_two_gaussians():
    """N(0, I) against N(δ, diag(s²)) in 4 dimensions, 2000 vectors each: the interval holds the
    closed-form distance, and its width matches the spread of FID over fresh draws."""
    d, n = 4, 2000
    shift, scale = np.array([1.0, 0.5, 0.0, 0.0]), np.array([1.0, 1.5, 1.0, 0.5])
    expected = float((shift**2).sum() + ((1 - scale) ** 2).sum())  # 1.25 + 0.5 = 1.75

    def draw(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = _rng(seed)
        return rng.normal(size=(n, d)), rng.normal(size=(n, d)) * scale + shift

    interval = bootstrap_interval(fid, *draw(100), n_resamples=200, seed=0)
    assert expected in interval
    fresh = np.std([fid(*draw(200 + i)) for i in range(30)])
    # a 90% interval spans about 2 x 1.645 standard deviations
    assert 0.6 < (interval.high - interval.low) / (2 * 1.645 * fresh) < 1.8


def test_bootstrap_intervals_of_one_distribution_hold_the_real_vs_real_value():
    """Real A, real B and synthetic F drawn from one distribution: the intervals of (A, F) hold the
    values of (A, B), the real-vs-real reference at the same n."""
    rng = _rng(110)
    a, b, f = (rng.normal(size=(150, 6)) for _ in range(3))

    def metrics(real, fake) -> dict[str, float]:
        dc = density_coverage(real, fake)
        return {"fid": fid(real, fake), **_pr(real, fake), "density": dc.density, "coverage": dc.coverage}

    intervals = bootstrap_intervals(metrics, a, f, n_resamples=100, seed=0)
    reference = metrics(torch.from_numpy(a), torch.from_numpy(b))
    assert set(intervals) == set(reference)
    for key, value in reference.items():
        assert value in intervals[key], key


def test_bootstrap_intervals_leave_out_what_a_half_sample_cannot_compute():
    x, y = _rng(120).normal(size=(8, 3)), _rng(121).normal(size=(8, 3))
    # precision/recall with k = 3 need more than 3 vectors: 8 have them, a half-sample of 4 too,
    # density/coverage with k = 5 need 6: the full sets only

    def metrics(real, fake) -> dict[str, float]:
        out = _pr(real, fake)
        if len(real) > 5:
            out["coverage"] = density_coverage(real, fake).coverage
        return out

    assert set(bootstrap_intervals(metrics, x, y, n_resamples=10)) == {"precision", "recall"}


def test_bootstrap_interval_rejects_bad_arguments():
    x = _rng(130).normal(size=(10, 3))
    with pytest.raises(ValueError, match="n_resamples must be >= 10; got 5"):
        bootstrap_interval(fid, x, x, n_resamples=5)
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
            bootstrap_interval(fid, x, x, level=level)
    with pytest.raises(ValueError, match="at least 4 feature vectors per set; got 10 and 3"):
        bootstrap_interval(fid, x, x[:3])
    with pytest.raises(ValueError, match="different widths"):
        bootstrap_interval(fid, x, x[:, :2])
