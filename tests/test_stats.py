"""The report's intervals (pipeline/stats.py) against independent computations: scipy and Monte Carlo runs of
the model they assume."""
import numpy as np
import pytest
from scipy import stats

from pipeline.stats import Interval, mean_interval, median_interval, paired_table, seeds_for_power


def test_one_seed_is_the_paired_t_interval_over_images():
    rng = np.random.default_rng(0)
    a, b = rng.random(3000) < 0.74, rng.random(3000) < 0.72  # two runs' per-image correctness
    iv = mean_interval(paired_table([{0: a}], [{0: b}]))
    ci = stats.ttest_rel(a.astype(float), b.astype(float)).confidence_interval(0.95)
    assert (iv.low, iv.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert iv.seeds == 1 and iv.n == 3000 and "test images only" in iv.method


def test_seeds_and_images_interval_has_its_coverage():
    """x[s, i] = mu + a_s + b_i + e_si: the interval covers mu in 95% of simulated studies, and its variance is
    the sampling variance of the mean (3 seeds, as the default profile)."""
    rng = np.random.default_rng(1)
    seeds, images, sd_seed, sd_image, sd_resid = 3, 1500, 0.006, 0.3, 0.25
    truth = sd_seed**2 / seeds + sd_image**2 / images + sd_resid**2 / (seeds * images)
    means, variances, covered = [], [], 0
    for _ in range(2000):
        x = (0.01 + rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_image, (1, images))
             + rng.normal(0, sd_resid, (seeds, images)))
        iv = mean_interval(x)
        means.append(x.mean())
        variances.append(iv.se**2)
        covered += iv.contains(0.01)
    assert np.var(means) == pytest.approx(truth, rel=0.1)
    assert np.mean(variances) == pytest.approx(truth, rel=0.1)
    assert 0.93 <= covered / 2000 <= 0.97


def test_minimal_detectable_effect_is_found_with_its_power():
    rng = np.random.default_rng(2)
    mde = mean_interval(rng.normal(0, 1, 400)).mde
    found = sum(mean_interval(rng.normal(mde, 1, 400)).low > 0 for _ in range(2000)) / 2000
    assert found == pytest.approx(0.8, abs=0.03)


@pytest.mark.parametrize("n", [6, 9, 20])
def test_median_interval_is_scipys_order_statistic_interval(n):
    x = np.random.default_rng(n).normal(100, 5, n)
    ci = stats.quantile_test(x, q=np.median(x), p=0.5).confidence_interval(0.95)
    iv = median_interval(x)
    assert (iv.low, iv.high) == (ci.low, ci.high) and iv.mean == np.median(x)
    assert iv.coverage >= 0.95
    assert median_interval([1.0, 2.0]).coverage == 0.5  # too few rounds for 95%: said, not hidden


def test_a_contrast_uses_the_seeds_all_its_variants_have():
    ones, zeros = np.ones(4), np.zeros(4)
    table = paired_table([{0: ones, 1: ones, 2: ones}], [{0: zeros}])  # a teacher is trained once: seed 0
    assert table.shape == (1, 4) and table.sum() == 4
    with pytest.raises(ValueError, match="share no seed"):
        paired_table([{1: ones}], [{0: zeros}])


def test_sensitivity_trains_t1_and_reads_a_finished_configuration_back(tmp_path, monkeypatch):
    """`python -m pipeline sensitivity` on the smoke profile: T1's two variants at two seeds, the T1 interval
    computed as the report computes it (paired by seed and image), and a finished configuration not retrained."""
    from pipeline import sensitivity

    monkeypatch.chdir(tmp_path)
    r = sensitivity.configuration("smoke", "300x1", 300, 1, [0, 1], jobs=2)
    root = tmp_path / "results" / "sensitivity" / "smoke" / "300x1"
    assert sorted(p.name for p in (root / "runs").iterdir()) == [
        "identity-ce", "identity-ce-seed1", "pooling-ce", "pooling-ce-seed1"]
    assert set(r["top1"]) == {"pooling-ce", "identity-ce"} and r["t1"]["low"] <= r["t1"]["mean"] <= r["t1"]["high"]
    # the same number from the per-seed accuracies: the interval's centre is the mean paired difference
    diff = [r["top1"]["identity-ce"][s] - r["top1"]["pooling-ce"][s] for s in ("0", "1")]
    assert abs(r["t1"]["mean"] - sum(diff) / 2) < 1e-9
    (root / "runs" / "identity-ce" / "model.pt").unlink()  # read back from result.json: nothing retrained
    assert sensitivity.configuration("smoke", "300x1", 300, 1, [0, 1]) == r


def test_seeds_for_power_detect_the_effect_with_that_power():
    """At the variance components of the crossed model, the seeds found detect the effect in >= 80% of simulated
    studies (and the fewest such seeds: one seed less falls short); the current MDE needs the current seeds."""
    rng = np.random.default_rng(3)
    images, sd_seed, sd_image, sd_resid, effect = 1000, 0.02, 0.2, 0.25, 0.035
    known = Interval(0, 0, 0, seeds=3, n=images, components=(sd_seed**2, sd_image**2, sd_resid**2))
    s = seeds_for_power(known, effect)
    assert s is not None and s > 3

    def power(seeds):
        found = 0
        for _ in range(1000):
            x = (effect + rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_image, (1, images))
                 + rng.normal(0, sd_resid, (seeds, images)))
            found += mean_interval(x).low > 0
        return found / 1000
    assert power(s) >= 0.77 and power(s - 1) < power(s)
    measured = mean_interval(rng.normal(0, sd_image, (1, images)) + rng.normal(0, sd_resid, (3, images))
                             + rng.normal(0, sd_seed, (3, 1)))
    assert seeds_for_power(measured, measured.mde) == 3
    assert seeds_for_power(measured.scaled(100), 100 * measured.mde) == 3  # in points as the report shows it
    assert seeds_for_power(measured, 0.001) is None  # below what the test images alone resolve
    assert seeds_for_power(mean_interval(rng.normal(0, 1, 50)), 1.0) is None  # one seed: no seed component
