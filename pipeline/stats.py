"""The report's intervals: accuracies and their differences over seeds and test images; throughput medians.

**Accuracy cells and their Δ.** A cell is the mean of an S × N table x[s, i] (seed s, test image i). For an
accuracy, x is 1 where the run of seed s classifies image i correctly. For a Δ it is a contrast of such
indicators: the mean over some variants minus the mean over others, taken per seed and per image. Variants
of the same seed start from the same initialisation and see the same batches, and all of them classify the
same test images, so a Δ is paired by seed and by image.

Both the seeds and the test images are samples: what a Δ estimates is the expected difference over training
randomness and over the test distribution. In the crossed random-effects model
x[s, i] = μ + a_s + b_i + e_si, the mean of the table has variance

    Var = σ²_a / S + σ²_b / N + σ²_e / (S N),

estimated from the two-way ANOVA mean squares (a negative variance component is set to 0), with
Satterthwaite's degrees of freedom for the t quantile. With one seed σ²_a cannot be estimated, and the
interval is the paired t interval over the test images alone (the same as scipy.stats.ttest_1samp's); the
report says so. Why not a bootstrap: resampling both seeds and images counts σ²_e twice, and three seeds have
ten distinct resamples; the moment estimator is unbiased and takes one pass. Intervals are conditional on
the trained teachers (each teacher is trained once).

**Single-seed rows** (the teachers, and T6's systems that are teachers): their one run has a seed effect a_s too,
which one run cannot estimate. When the study has several seeds, the report adds an estimate of σ²_a: the seed
components of the study's multi-seed accuracy rows pooled by their S − 1 degrees of freedom
(`pooled_seed_variance`), with those df in Satterthwaite's formula; a Δ at one seed between k₊ and k₋ such runs
adds σ²_a (1/k₊ + 1/k₋) (independent seed effects on both sides). A variant of several seeds that all start from
one single-seed run (AdaViT fine-tuned from its DeiT teacher) shares that run's seed effect, which its own seeds
cannot show: its cell adds σ²_a, and a Δ adds σ²_a / k² for each such variant among a side's k. This assumes
the teachers' seed-to-seed spread is the students' (other architectures, other epochs); it is the part that lets
two honest runs on two machines, whose attention models do not train bit-identically, be compared.
`report.single_seed_sd` sets it: `pooled`, a number of points, or null (images only).

**Quantities of learned values** (AdaViT's expected MACs follow its learned gates): the mean over seeds with the
t interval over seeds (`estimate_over_seeds`), not a count.

The minimal detectable effect (MDE) at level α and power 1 − β is (t_{1−α/2} + t_{1−β}) · SE: the true
difference that the current seeds and test size find with probability 1 − β. The seeds that would find a given
effect d with that power (`seeds_for_power`) are the smallest S whose MDE is ≤ |d| when the variance components
measured here are held fixed: Var(S) = σ²_a / S + σ²_b / N + σ²_e / (S N), with the Satterthwaite df of S seeds.
When σ²_b / N alone already puts the MDE above |d|, no number of seeds does (more test images would).

**Throughput.** The benchmark times every model once per interleaved round; a cell is the median over the
rounds and a Δ the median of the per-round ratios. Its interval is the distribution-free one for a median,
[x_(k), x_(n−k+1)] from the order statistics, with its exact binomial coverage (below the level with fewer
than 6 rounds, and then reported as such).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval. `seeds` × `n` (test images, or rounds) is what it was computed from."""
    mean: float
    low: float
    high: float
    se: float | None = None
    df: float | None = None
    mde: float | None = None
    seeds: int = 1
    n: int = 0
    coverage: float = 0.95
    method: str = ""
    components: tuple[float, float, float] | None = None  # (σ²_a seed, σ²_b image, σ²_e residual): several seeds

    def side(self, threshold: float) -> int:
        """+1: the whole interval is above `threshold`; -1: below; 0: it contains it."""
        return 1 if self.low > threshold else -1 if self.high < threshold else 0

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def scaled(self, k: float) -> Interval:
        return replace(self, mean=self.mean * k, low=self.low * k, high=self.high * k,
                       se=None if self.se is None else self.se * k, mde=None if self.mde is None else self.mde * k,
                       components=None if self.components is None else tuple(c * k * k for c in self.components))


def variance_of_mean(x: np.ndarray) -> tuple[float, float, dict]:
    """(Var of the table's mean, Satterthwaite df, variance components) for an S × N table (see module doc)."""
    x = np.asarray(x, dtype=float)
    s, n = x.shape
    if s == 1:
        var = x[0].var(ddof=1) / n
        return var, n - 1, {"image": x[0].var(ddof=1)}
    grand = x.mean()
    seed_means, image_means = x.mean(1), x.mean(0)
    ms_seed = n * seed_means.var(ddof=1)
    ms_image = s * image_means.var(ddof=1)
    df_seed, df_image, df_resid = s - 1, n - 1, (s - 1) * (n - 1)
    ms_resid = ((x - seed_means[:, None] - image_means[None, :] + grand) ** 2).sum() / df_resid
    # Var * S * N = max(MS_seed - MS_e, 0) + max(MS_image - MS_e, 0) + MS_e, as a sum of c_k * MS_k
    c_seed, c_image = float(ms_seed > ms_resid), float(ms_image > ms_resid)
    terms = [(c_seed, ms_seed, df_seed), (c_image, ms_image, df_image), (1 - c_seed - c_image, ms_resid, df_resid)]
    total = sum(c * ms for c, ms, _ in terms)
    denom = sum((c * ms) ** 2 / df for c, ms, df in terms if c)
    df = total ** 2 / denom if denom > 0 else float("inf")
    components = {"seed": max(ms_seed - ms_resid, 0.0) / n, "image": max(ms_image - ms_resid, 0.0) / s,
                  "residual": ms_resid}
    return total / (s * n), df, components


def mean_interval(x, level: float = 0.95, power: float = 0.8, seed_var: tuple[float, float] | None = None
                  ) -> Interval:
    """Interval of the mean of an S × N table (a 1-D array is one seed), with its MDE. `seed_var`: (variance, df)
    of a seed part the table cannot show, estimated elsewhere (module doc: single-seed rows, shared inits)."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    s, n = x.shape
    if n < 2:
        raise ValueError(f"an interval needs at least 2 test images, got {n}")
    var, df, _ = variance_of_mean(x)
    method = (f"{s} seeds x {n} test images, paired" if s > 1 else
              f"one seed: {n} test images only (the seed-to-seed part is not in this interval)")
    if seed_var is not None and seed_var[0] > 0:
        v_seed, df_seed = seed_var
        total = var + v_seed
        df = total ** 2 / (var ** 2 / df + v_seed ** 2 / df_seed)
        var = total
        part = "a seed part" if s == 1 else "the seed part of a one-seed init"
        method = (f"{s} seed{'s' * (s > 1)} x {n} test images, and {part} estimated from the study's multi-seed "
                  f"rows ({df_seed:g} df)")
    mean, se = float(x.mean()), float(np.sqrt(max(var, 0.0)))
    t = stats.t.ppf(0.5 + level / 2, df)
    mde = (t + stats.t.ppf(power, df)) * se
    parts = _components(x) if s > 1 else None
    return Interval(mean, mean - t * se, mean + t * se, se, float(df), float(mde), s, n, level, method, parts)


def pooled_seed_variance(tables: list[np.ndarray]) -> tuple[float, float] | None:
    """(σ²_a, df): the seed variance component pooled over S × N tables of several seeds, each weighted by its
    S − 1 degrees of freedom; None without such a table."""
    parts = [(t.shape[0] - 1, variance_of_mean(t)[2]["seed"]) for t in tables if t.shape[0] > 1]
    df = sum(d for d, _ in parts)
    return (sum(d * v for d, v in parts) / df, float(df)) if df else None


def estimate_over_seeds(values: list[float], level: float = 0.95, method: str = "") -> Interval:
    """A quantity measured once per seed (e.g. expected MACs, which follow learned gates): the mean over seeds and
    its t interval; with one seed, the value alone (no width to estimate)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        v = float(x[0])
        return Interval(v, v, v, seeds=1, coverage=level, method=f"{method}, one seed: no interval")
    se = float(x.std(ddof=1) / np.sqrt(len(x)))
    t = stats.t.ppf(0.5 + level / 2, len(x) - 1)
    mean = float(x.mean())
    return Interval(mean, mean - t * se, mean + t * se, se, float(len(x) - 1), seeds=len(x), n=len(x),
                    coverage=level, method=f"{method}, mean over {len(x)} seeds, t interval")


def _components(x: np.ndarray) -> tuple[float, float, float]:
    c = variance_of_mean(x)[2]
    return float(c["seed"]), float(c["image"]), float(c["residual"])


def seeds_for_power(iv: Interval, effect: float, level: float = 0.95, power: float = 0.8) -> int | None:
    """The fewest seeds whose MDE (at `level`, `power`) is <= |effect|, with the variance components of `iv` and its
    test images held fixed (module doc). None: no number of seeds suffices (the test images' share alone is too
    large, or the effect is 0), or `iv` has no seed component (one seed)."""
    if iv.components is None or effect == 0:
        return None
    seed, image, resid = iv.components
    n = iv.n

    def mde(s: int) -> float:
        coef = [float(seed > 0), float(image > 0)]
        coef.append(1 - coef[0] - coef[1])
        ms = [(n * seed + resid, s - 1), (s * image + resid, n - 1), (resid, (s - 1) * (n - 1))]
        total = sum(c * m for c, (m, _) in zip(coef, ms, strict=True))
        denom = sum((c * m) ** 2 / d for c, (m, d) in zip(coef, ms, strict=True) if c)
        df = total ** 2 / denom if denom > 0 else float("inf")
        return (stats.t.ppf(0.5 + level / 2, df) + stats.t.ppf(power, df)) * np.sqrt(max(total, 0.0) / (s * n))

    if mde(10 ** 9) > abs(effect):  # the limit of many seeds: the test images' share
        return None
    hi = 2
    while mde(hi) > abs(effect):  # the MDE falls with S: double, then bisect
        hi *= 2
    lo = max(2, hi // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if mde(mid) > abs(effect) else (lo, mid)
    return lo


def paired_table(plus: list[dict[int, np.ndarray]], minus: list[dict[int, np.ndarray]] = ()) -> np.ndarray:
    """The S × N table of a contrast: per seed and image, the mean of the `plus` variants' values minus the
    mean of the `minus` variants' ({seed: per-image values} each), over the seeds that all of them have."""
    groups = list(plus) + list(minus)
    seeds = sorted(set.intersection(*(set(g) for g in groups)))
    if not seeds:
        raise ValueError("the variants of this contrast share no seed")
    rows = []
    for seed in seeds:
        row = np.mean([g[seed] for g in plus], axis=0, dtype=float)
        if minus:
            row = row - np.mean([g[seed] for g in minus], axis=0, dtype=float)
        rows.append(row)
    return np.stack(rows)


def median_interval(samples, level: float = 0.95) -> Interval:
    """The median of `samples` with the distribution-free interval [x_(k), x_(n-k+1)] (module doc)."""
    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    k = 1  # widen no further than the level needs: the largest k whose coverage still reaches it
    while k < (n + 1) // 2 and 1 - 2 * stats.binom.cdf(k, n, 0.5) >= level:
        k += 1
    coverage = float(1 - 2 * stats.binom.cdf(k - 1, n, 0.5))
    return Interval(float(np.median(x)), float(x[k - 1]), float(x[n - k]), n=n, coverage=coverage,
                    method=f"median of {n} interleaved rounds, order-statistic interval")


def exact(value: float) -> Interval:
    """A counted quantity (parameters, MACs): no sampling, so no width."""
    return Interval(value, value, value, se=0.0, coverage=1.0, method="exact count")
