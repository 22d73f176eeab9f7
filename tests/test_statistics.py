"""Tests of latticeflow.statistics against exactly solvable series.

The AR(1) process x_t = ρ x_{t−1} + sqrt(1−ρ²) ε_t, started from x_0 ~ N(0, 1), is stationary with
unit variance and ρ(t) = ρ^|t|, hence τ_int = (1+ρ)/(2(1−ρ)) and, summing Σ_{i,j} ρ^|i−j|,
    Var(x̄) = [(1+ρ)/(1−ρ) − 2ρ(1−ρ^N)/(N(1−ρ)²)] / N   exactly for N samples.
Tolerances on ensembles of chains are ~3–4 standard deviations of the quantity tested.
"""

import warnings
from functools import cache

import numpy as np
import pytest
from scipy.signal import lfilter

from latticeflow.statistics import (
    ShortChainWarning,
    bin_series,
    bootstrap,
    ess,
    gamma_method,
    jackknife,
    reweighted_mean,
    running_mean,
)

N_CHAINS = 400
N_SAMPLES = 10_000
RHOS = [0.9, 0.0, -0.5]


def ar1(rho: float, n: int, chains: int, rng: np.random.Generator) -> np.ndarray:
    """``chains`` independent stationary AR(1) series, shape ``(chains, n)``."""
    eps = rng.standard_normal((chains, n))
    x_before = rng.standard_normal((chains, 1))
    return lfilter([np.sqrt(1.0 - rho**2)], [1.0, -rho], eps, axis=1, zi=rho * x_before)[0]


def exact_tau(rho: float) -> float:
    return (1.0 + rho) / (2.0 * (1.0 - rho))


def exact_var_of_mean(rho: float, n: int) -> float:
    return ((1 + rho) / (1 - rho) - 2 * rho * (1 - rho**n) / (n * (1 - rho) ** 2)) / n


@cache
def ar1_ensemble(rho: float) -> dict[str, np.ndarray]:
    """Γ-method results for N_CHAINS chains of N_SAMPLES, as arrays over chains."""
    rng = np.random.default_rng(int(1000 * (rho + 1)))
    results = [gamma_method(chain) for chain in ar1(rho, N_SAMPLES, N_CHAINS, rng)]
    fields = ["value", "error", "tau_int", "tau_int_error", "window"]
    return {k: np.array([getattr(r, k) for r in results]) for k in fields}


# --- Γ-method on AR(1) ----------------------------------------------------------------------


@pytest.mark.parametrize("rho", RHOS)
def test_tau_int_matches_exact(rho):
    r = ar1_ensemble(rho)
    standard_error = r["tau_int"].std(ddof=1) / np.sqrt(N_CHAINS)
    assert abs(r["tau_int"].mean() - exact_tau(rho)) < 4 * standard_error


@pytest.mark.parametrize("rho", RHOS)
def test_error_is_calibrated(rho):
    r = ar1_ensemble(rho)
    pulls = r["value"] / r["error"]  # the exact mean is 0
    # binomial: P(|pull| < 1) = 0.683 with sd sqrt(0.683·0.317/400) = 0.023; allow 3 sd
    assert abs(np.mean(np.abs(pulls) < 1.0) - 0.683) < 0.07
    # RMS of N(0,1) pulls has sd 1/sqrt(2·400) = 0.035; the error-of-error (≈ sqrt(W/N) ≤ 8%)
    # adds scatter of the same order, so allow 0.12
    assert abs(np.sqrt(np.mean(pulls**2)) - 1.0) < 0.12
    # the estimated variance of the mean vs the exact one: each chain's error² scatters by
    # 2 sqrt((W+½)/N) ≤ 16%, i.e. ≤ 0.8% for the average over 400 chains
    ratio = np.mean(r["error"] ** 2) / exact_var_of_mean(rho, N_SAMPLES)
    assert ratio == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("rho", RHOS)
def test_tau_int_error_matches_scatter(rho):
    r = ar1_ensemble(rho)
    # Madras–Sokal neglects O(ρ(t)²) terms, visible for ρ = −0.5 (stated ≈ 0.87 × scatter)
    assert r["tau_int_error"].mean() / r["tau_int"].std(ddof=1) == pytest.approx(1, abs=0.3)


def test_anticorrelated_window_extends_past_lag_one():
    # the plain Wolff rule stops at W = 1 here, where τ̂_int(1) = ½ + ρ(1) ≈ 0
    assert np.all(ar1_ensemble(-0.5)["window"] > 1)


def test_replicas_consistent_with_one_long_chain():
    chain = ar1(0.8, 40_000, 1, np.random.default_rng(1))[0]
    whole = gamma_method(chain)
    split = gamma_method(np.split(chain, [10_000, 17_000, 30_000]))
    assert split.n == whole.n == 40_000
    assert split.value == pytest.approx(whole.value, rel=1e-12)
    assert split.error == pytest.approx(whole.error, rel=0.02)
    assert split.tau_int == pytest.approx(whole.tau_int, abs=0.2 * whole.tau_int_error)


def test_replica_autocovariance_against_direct_sums():
    rng = np.random.default_rng(2)
    replicas = [ar1(0.7, n, 1, rng)[0] for n in (300, 500, 420)]
    result = gamma_method(replicas)
    n, w = 1220, result.window
    delta = [r - np.concatenate(replicas).mean() for r in replicas]
    gamma = [
        sum(d[: len(d) - t] @ d[t:] for d in delta) / sum(len(d) - t for d in delta)
        for t in range(w + 1)
    ]
    c_f = (gamma[0] + 2 * sum(gamma[1:])) * (1 + (2 * w + 1) / n)
    assert result.error == pytest.approx(np.sqrt(c_f / n), rel=1e-10)
    assert result.tau_int_curve[w] == result.tau_int


def test_derived_linear_function_equals_primary():
    rng = np.random.default_rng(3)
    x = ar1(0.5, 5000, 2, rng).T
    primary = gamma_method(x[:, 0])
    derived = gamma_method(x, derived=lambda m: m[0])
    assert derived.value == pytest.approx(primary.value, rel=1e-12)
    assert derived.error == pytest.approx(primary.error, rel=1e-8)
    with pytest.raises(ValueError, match="derived"):
        gamma_method(x)


def test_short_chain_warning():
    chain = ar1(0.95, 300, 1, np.random.default_rng(4))[0]
    with pytest.warns(ShortChainWarning):
        gamma_method(chain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gamma_method(np.random.default_rng(5).standard_normal(2000))


def test_constant_series_has_zero_error():
    result = gamma_method(np.full(100, 3.0))
    assert (result.value, result.error, result.tau_int) == (3.0, 0.0, 0.5)


# --- binning and resampling -----------------------------------------------------------------


def test_bin_series():
    np.testing.assert_allclose(bin_series(np.arange(10.0), 3), [1.0, 4.0, 7.0])
    binned = bin_series(np.arange(20.0).reshape(10, 2), 5)
    np.testing.assert_allclose(binned, [[4.0, 5.0], [14.0, 15.0]])


def test_jackknife_bias_correction_is_exact_for_squared_mean():
    # with single-element bins the corrected jackknife of x̄² is x̄² − s²/N (unbiased for μ²)
    x = np.random.default_rng(6).normal(0.3, 1.0, 500)
    value, _ = jackknife(lambda m: m**2, x, n_bins=500)
    assert value == pytest.approx(x.mean() ** 2 - x.var(ddof=1) / 500, rel=1e-10)


def correlated_pair(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 1.0, n)
    return np.column_stack([x, 0.5 * x + rng.normal(1.0, 0.5, n)])


def test_jackknife_ratio_matches_delta_method():
    data = correlated_pair(20_000, 7)

    def ratio(m):
        return m[0] / m[1]

    value, error = jackknife(ratio, data, n_bins=len(data))
    mx, my = data.mean(axis=0)
    grad = np.array([1 / my, -mx / my**2])
    delta = np.sqrt(grad @ np.cov(data.T, ddof=0) @ grad / len(data))
    assert value == pytest.approx(mx / my, abs=0.01 * error)
    assert error == pytest.approx(delta, rel=1e-3)
    # the Γ-method sums a few noisy lags (W ~ 2): a few percent
    assert gamma_method(data, derived=ratio).error == pytest.approx(delta, rel=0.05)


def test_jackknife_of_second_moment_ratio_matches_gamma_method():
    x = np.random.default_rng(8).normal(1.0, 1.0, 20_000)
    data = np.column_stack([x, x**2])

    def ratio(m):
        return m[1] / m[0] ** 2

    jack = jackknife(ratio, data, n_bins=1000)
    gamma = gamma_method(data, derived=ratio)
    # 1000 bins: jackknife error has relative sd ~ 1/sqrt(2·1000) ≈ 2%
    assert jack.error == pytest.approx(gamma.error, rel=0.1)
    assert jack.value == pytest.approx(gamma.value, abs=0.1 * gamma.error)


def test_bootstrap_agrees_with_jackknife():
    data = correlated_pair(20_000, 9)

    def ratio(m):
        return m[0] / m[1]

    jack = jackknife(ratio, data, n_bins=200)
    boot = bootstrap(ratio, data, n_bins=200, n_boot=2000, rng=10)
    # same bins: only the bootstrap's own noise, 1/sqrt(2·2000) ≈ 1.6%
    assert boot.error == pytest.approx(jack.error, rel=0.06)
    assert boot.value == pytest.approx(jack.value, abs=0.1 * jack.error)


# --- importance sampling --------------------------------------------------------------------


def test_ess_limits_and_stability():
    n = 1000
    lw = np.random.default_rng(11).normal(0.0, 1.0, n)
    direct = np.exp(lw).sum() ** 2 / (n * np.exp(2 * lw).sum())
    assert ess(lw) == pytest.approx(direct, rel=1e-12)
    assert ess(np.zeros(n)) == pytest.approx(1.0, rel=1e-12)
    dominant = np.zeros(n)
    dominant[17] = 50.0
    assert ess(dominant) == pytest.approx(1.0 / n, rel=1e-6)
    assert ess(lw + 123.4) == pytest.approx(ess(lw), rel=1e-12)
    assert ess(lw + 1e4) == pytest.approx(direct, rel=1e-12)
    assert ess(-1e4 * np.ones(n)) == pytest.approx(1.0, rel=1e-12)


def gaussian_pair(mu: float, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, 1) and log w = log N(x; μ, 1) − log N(x; 0, 1) + an arbitrary constant."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return x, mu * x - 0.5 * mu**2 + 7.0


def test_reweighted_mean_recovers_shifted_gaussian():
    mu, n = 0.5, 10_000
    x, lw = gaussian_pair(mu, (n,), 12)
    result = reweighted_mean(np.column_stack([x, x**2]), lw)
    assert abs(result.value[0] - mu) < 4 * result.error[0]
    assert abs(result.value[1] - (1 + mu**2)) < 4 * result.error[1]
    assert result.ess == pytest.approx(np.exp(-(mu**2)), abs=0.05)  # 1/E_q[w²] for this pair
    # iid samples: the delta-method error equals the Γ-method of the ratio <wx>/<w>
    w = np.exp(lw - lw.max())
    gamma = gamma_method(np.column_stack([w * x, w]), derived=lambda m: m[0] / m[1])
    assert result.error[0] == pytest.approx(gamma.error, rel=0.05)


def test_reweighted_mean_error_is_calibrated():
    mu = 0.5
    x, lw = gaussian_pair(mu, (N_CHAINS, 5000), 13)
    results = [reweighted_mean(xi, li) for xi, li in zip(x, lw, strict=True)]
    pulls = np.array([(r.value - mu) / r.error for r in results])
    assert abs(np.mean(np.abs(pulls) < 1.0) - 0.683) < 0.07  # 3 binomial sd, as above
    assert abs(np.sqrt(np.mean(pulls**2)) - 1.0) < 0.12


def test_running_mean_skips_non_finite_values():
    values = [1.0, np.nan, 3.0, np.nan, np.nan, 6.0]
    # windows of 2: [1, nan], [nan, 3], [3, nan], [nan, nan], [nan, 6]
    np.testing.assert_allclose(running_mean(values, 2), [1.0, 3.0, 3.0, np.nan, 6.0])
    np.testing.assert_allclose(running_mean(np.arange(5.0), 3), [1.0, 2.0, 3.0])
