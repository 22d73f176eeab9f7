"""Statistical analysis of Monte Carlo data: Γ-method, binning, resampling, importance weights.

Conventions
-----------
* A time series is an array of shape ``(N,)`` (one observable) or ``(N, n_obs)`` (several primary
  observables measured on the same configurations); axis 0 is Monte Carlo time.
* Functions of means (``derived`` in :func:`gamma_method`, ``f`` in :func:`jackknife` and
  :func:`bootstrap`) receive the sample means with the shape of one measurement: a scalar for
  ``(N,)`` data, an ``(n_obs,)`` array for ``(N, n_obs)`` data.
* Γ(t) is the autocovariance at lag t, ρ(t) = Γ(t)/Γ(0) and τ_int(W) = 1/2 + Σ_{t=1}^W ρ(t), so that
  the variance of the mean of N samples is 2 τ_int Γ(0) / N (τ_int = 1/2 for uncorrelated data).
* Importance weights are given as log weights, log w = log p̃ − log q (any additive constant);
  :func:`ess` is their effective sample size, :func:`pareto_k` the tail index of the largest.

Reference: U. Wolff, "Monte Carlo errors with less errors", Comput. Phys. Commun. 156 (2004) 143,
hep-lat/0306017. Equation numbers below refer to that paper.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike
from scipy.special import logsumexp

#: a chain ``(N,)`` / ``(N, n_obs)``, or a list of independent replicas of that form
SeriesData = ArrayLike | list[ArrayLike]
MeanFunction = Callable[[np.ndarray], float]

#: Relative spread below which values count as equal (round-off): a constant series of log
#: weights, a degenerate weight tail.
ROUND_OFF = 1e-12


class ShortChainWarning(UserWarning):
    """The chain is too short for a reliable error: N < 50 τ_int, or no window was found."""


@dataclass(frozen=True)
class GammaResult:
    """Result of :func:`gamma_method`.

    ``rho[t]`` (t = 0 … W_max) is the bias-corrected normalised autocorrelation function and
    ``tau_int_curve[W]`` the integrated autocorrelation time summed up to window W, so that
    ``tau_int_curve[window] == tau_int``.  ``n`` is the total number of measurements (all replicas).
    """

    value: float
    error: float
    error_of_error: float
    tau_int: float
    tau_int_error: float
    window: int
    rho: np.ndarray
    tau_int_curve: np.ndarray
    n: int


class Estimate(NamedTuple):
    """Value and standard error (scalars, or arrays when the function returns an array)."""

    value: float | np.ndarray
    error: float | np.ndarray


class ReweightedMean(NamedTuple):
    """Self-normalised importance-sampling estimate, its standard error and the ESS in (0, 1]."""

    value: float | np.ndarray
    error: float | np.ndarray
    ess: float


# --------------------------------------------------------------------------------------------
# Γ-method
# --------------------------------------------------------------------------------------------


def gamma_method(
    data: SeriesData, derived: MeanFunction | None = None, s_tau: float = 1.5
) -> GammaResult:
    """Mean (or a function of means) with its error from the autocorrelation function.

    ``data`` is one chain ``(N,)`` / ``(N, n_obs)`` or a list of independent replicas of possibly
    different lengths; replicas are combined as in Wolff §3: one global mean, and Γ(t) is the sum
    of the lag-t products over all replicas divided by Σ_r (N_r − t).  Without ``derived`` the data
    must hold a single observable and its mean is estimated; with ``derived`` the estimate is
    F = derived(means), whose error follows from the projected series Σ_α f_α (a_α − ā_α), where the
    gradient f_α = ∂F/∂ā_α is taken by central differences with step ``sqrt(Γ_αα(0)/N)`` (the naive
    error of ā_α, the scale on which F is linearised).  F itself is not bias corrected.

    Window W (eq. 52): the first W ≥ 1 where g(W) = exp(−W/τ) − τ/sqrt(W N) < 0, with
    τ = s_tau / ln((2τ̂+1)/(2τ̂−1)) and τ̂ = τ̂_int(W); τ → 0 (stop) when τ̂ ≤ 1/2.  For an
    anticorrelated series (ρ(1) < 0, common with HMC) the partial sums τ̂_int(W) start below 1/2 and
    this rule would stop at W = 1, missing everything beyond lag 1.  In that case τ̂ is instead the
    envelope sum 1/2 + Σ_{t≤W} |ρ(t)|, which for a decaying oscillation ρ(t) ∝ (−λ)^t gives the same
    window as for a positive chain with ρ(t) ∝ λ^t; the error still uses the signed sum of Γ(t).

    Bias corrections (eqs. 31, 49): Γ(t) → Γ(t) + C_F(W)/N, which turns C_F(W) = Γ(0) + 2Σ_{t≤W}Γ(t)
    into C_F(W)(1 + (2W+1)/N); then error = sqrt(C_F/N), τ_int = C_F/(2Γ(0)).  The error of the
    error is error·sqrt((W + 1/2)/N) (eq. 44) and the error of τ_int is the Madras–Sokal estimate
    2 τ_int sqrt((W + 1/2 − τ_int)/N) (eq. 42).  The largest window tried is min_r N_r / 2.

    Warns with :class:`ShortChainWarning` when N < 50 τ_int or when no window satisfies the
    criterion (then W = min_r N_r / 2 is used).
    """
    replicas, sample_shape = _as_replicas(data)
    n = sum(len(r) for r in replicas)
    means = sum(r.sum(axis=0) for r in replicas) / n
    if derived is None:
        if means.size != 1:
            raise ValueError(
                f"data holds {means.size} observables: pass derived=f(means) or analyse the "
                "columns one by one"
            )
        value, grad = float(means[0]), np.ones(1)
    else:
        variances = sum(((r - means) ** 2).sum(axis=0) for r in replicas) / n
        value = float(derived(means.reshape(sample_shape)))
        grad = _gradient(derived, means, np.sqrt(variances / n), sample_shape)

    gamma = _autocovariance([(r - means) @ grad for r in replicas], min(map(len, replicas)) // 2)
    if gamma[0] <= 0.0:  # constant observable, or F independent of the means
        return GammaResult(value, 0.0, 0.0, 0.5, 0.0, 0, np.ones(1), np.full(1, 0.5), n)

    window = _window(gamma / gamma[0], n, s_tau)
    if window is None:
        window = len(gamma) - 1
        warnings.warn(
            f"Γ-method: no window W <= {window} satisfies the criterion; the chain is too short "
            "for its autocorrelation time",
            ShortChainWarning,
            stacklevel=2,
        )
    c_f = gamma[0] + 2.0 * gamma[1 : window + 1].sum()
    gamma = gamma + c_f / n
    c_f = gamma[0] + 2.0 * gamma[1 : window + 1].sum()
    rho = gamma / gamma[0]
    tau_int_curve = np.cumsum(rho) - 0.5
    tau_int = float(tau_int_curve[window])
    error = float(np.sqrt(max(c_f, 0.0) / n))
    error_of_error = error * np.sqrt((window + 0.5) / n)
    tau_int_error = 2.0 * abs(tau_int) * np.sqrt(max(window + 0.5 - tau_int, 0.0) / n)
    if n < 50.0 * tau_int:
        warnings.warn(
            f"Γ-method: N = {n} < 50 τ_int = {50.0 * tau_int:.0f}; error and τ_int are unreliable",
            ShortChainWarning,
            stacklevel=2,
        )
    return GammaResult(
        value=value,
        error=error,
        error_of_error=float(error_of_error),
        tau_int=tau_int,
        tau_int_error=float(tau_int_error),
        window=window,
        rho=rho,
        tau_int_curve=tau_int_curve,
        n=n,
    )


def _as_replicas(data: SeriesData) -> tuple[list[np.ndarray], tuple[int, ...]]:
    """Replicas as float arrays ``(N_r, n_obs)``, and the shape of one measurement."""
    chains = data if isinstance(data, list | tuple) else [data]
    arrays = [np.asarray(c, dtype=float) for c in chains]
    if not arrays or any(a.ndim not in (1, 2) for a in arrays):
        raise ValueError("data must be an (N,) or (N, n_obs) array, or a list of such arrays")
    if len({a.shape[1:] for a in arrays}) != 1:
        raise ValueError("all replicas must have the same number of observables")
    if min(len(a) for a in arrays) < 4:
        raise ValueError("every replica needs at least 4 measurements")
    return [a.reshape(len(a), -1) for a in arrays], arrays[0].shape[1:]


def _gradient(
    f: MeanFunction, means: np.ndarray, steps: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Central-difference gradient of f at ``means``; zero along directions with zero step."""
    grad = np.zeros_like(means)
    for alpha in np.flatnonzero(steps):
        shift = np.zeros_like(means)
        shift[alpha] = steps[alpha]
        up = f((means + shift).reshape(shape))
        down = f((means - shift).reshape(shape))
        grad[alpha] = (up - down) / (2.0 * steps[alpha])
    return grad


def _autocovariance(series: list[np.ndarray], t_max: int) -> np.ndarray:
    """Γ(t), t = 0 … t_max, of mean-subtracted replicas: Σ_r Σ_i x_r(i) x_r(i+t) / Σ_r (N_r − t).

    Each replica is zero-padded to at least twice its length so the FFT correlation is acyclic.
    """
    sums = np.zeros(t_max + 1)
    counts = np.zeros(t_max + 1)
    lags = np.arange(t_max + 1)
    for x in series:
        n_fft = scipy.fft.next_fast_len(2 * len(x), real=True)
        spectrum = scipy.fft.rfft(x, n_fft)
        sums += scipy.fft.irfft(spectrum.real**2 + spectrum.imag**2, n_fft)[: t_max + 1]
        counts += len(x) - lags
    return sums / counts


def _window(rho: np.ndarray, n: int, s_tau: float) -> int | None:
    """Automatic window (see :func:`gamma_method`); None if g(W) ≥ 0 for all W ≤ len(rho) − 1."""
    lagged = rho[1:] if rho[1] >= 0.0 else np.abs(rho[1:])
    tau_hat = 0.5 + np.cumsum(lagged)
    w = np.arange(1, len(rho))
    # (2τ̂+1)/(2τ̂−1) = 1 + 2/(2τ̂−1); clipping 2τ̂−1 at `tiny` sends τ → 0 (g < 0) for τ̂ ≤ 1/2
    tau = s_tau / np.log1p(2.0 / np.maximum(2.0 * tau_hat - 1.0, np.finfo(float).tiny))
    g = np.exp(-w / tau) - tau / np.sqrt(w * n)
    stops = np.flatnonzero(g < 0.0)
    return int(w[stops[0]]) if stops.size else None


# --------------------------------------------------------------------------------------------
# Binning and resampling
# --------------------------------------------------------------------------------------------


def bin_series(x: ArrayLike, bin_size: int) -> np.ndarray:
    """Means of consecutive blocks of ``bin_size`` measurements along axis 0.

    ``(N, ...)`` → ``(N // bin_size, ...)``; the last ``N mod bin_size`` measurements are dropped.
    """
    x = np.asarray(x, dtype=float)
    if bin_size < 1 or bin_size > len(x):
        raise ValueError(f"bin_size must be in [1, {len(x)}], got {bin_size}")
    n_bins = len(x) // bin_size
    return x[: n_bins * bin_size].reshape(n_bins, bin_size, *x.shape[1:]).mean(axis=1)


def jackknife(f: MeanFunction, data: ArrayLike, n_bins: int) -> Estimate:
    """Jackknife over ``n_bins`` bins of f(means) for ``(N,)`` or ``(N, n_obs)`` data.

    The data are cut into ``n_bins`` bins of size N // n_bins (see :func:`bin_series`); f_j is f of
    the mean with bin j left out.  Returned value is the bias-corrected n f(ā) − (n−1) f̄_J, with
    f̄_J = mean_j f_j (removes the O(1/N) bias of f(ā)); the error is
    sqrt((n−1)/n Σ_j (f_j − f̄_J)²).  Bins must be much longer than τ_int for the error to include
    autocorrelations.  ``f`` may return a scalar or an array; value and error then have its shape.
    """
    bins = _bins(data, n_bins)
    total = bins.sum(axis=0)
    full = np.asarray(f(total / n_bins), dtype=float)
    leave_out = np.array([f((total - b) / (n_bins - 1)) for b in bins], dtype=float)
    mean_j = leave_out.mean(axis=0)
    value = n_bins * full - (n_bins - 1) * mean_j
    error = np.sqrt((n_bins - 1) / n_bins * ((leave_out - mean_j) ** 2).sum(axis=0))
    return Estimate(value[()], error[()])


def bootstrap(
    f: MeanFunction,
    data: ArrayLike,
    n_bins: int,
    n_boot: int = 1000,
    rng: np.random.Generator | int | None = None,
) -> Estimate:
    """Bootstrap over ``n_bins`` bins of f(means) for ``(N,)`` or ``(N, n_obs)`` data.

    Each of the ``n_boot`` samples draws ``n_bins`` bins with replacement.  The value is f of the
    full mean (no bias correction); the error is the standard deviation (ddof = 1) of f over the
    bootstrap samples.
    """
    bins = _bins(data, n_bins)
    picks = np.random.default_rng(rng).integers(0, n_bins, size=(n_boot, n_bins))
    samples = np.array([f(bins[p].mean(axis=0)) for p in picks], dtype=float)
    value = np.asarray(f(bins.mean(axis=0)), dtype=float)
    return Estimate(value[()], samples.std(axis=0, ddof=1)[()])


def _bins(data: ArrayLike, n_bins: int) -> np.ndarray:
    data = np.asarray(data, dtype=float)
    if not 2 <= n_bins <= len(data):
        raise ValueError(f"n_bins must be in [2, {len(data)}], got {n_bins}")
    return bin_series(data, len(data) // n_bins)[:n_bins]


# --------------------------------------------------------------------------------------------
# Importance sampling
# --------------------------------------------------------------------------------------------


def running_mean(values: ArrayLike, window: int) -> np.ndarray:
    """Means of the finite entries of each window of ``window`` consecutive values (``"valid"``
    positions only: length N − window + 1); NaN where a window holds no finite value."""
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    kernel = np.ones(window)
    total = np.convolve(np.where(finite, v, 0.0), kernel, "valid")
    count = np.convolve(finite.astype(float), kernel, "valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)


def ess(log_weights: ArrayLike) -> float:
    """Normalised effective sample size (Σw)² / (N Σw²) ∈ (0, 1], from log weights ``(N,)``.

    Computed as exp(2 logsumexp(log w) − logsumexp(2 log w) − log N): invariant under a constant
    shift of the log weights and free of overflow.
    """
    lw = np.asarray(log_weights, dtype=float)
    return float(np.exp(2.0 * logsumexp(lw) - logsumexp(2.0 * lw) - np.log(lw.size)))


def reweighted_mean(values: ArrayLike, log_weights: ArrayLike) -> ReweightedMean:
    """Self-normalised importance-sampling mean Ô = Σ w_i O_i / Σ w_i, its error and the ESS.

    ``values`` is ``(N,)`` or ``(N, n_obs)`` and ``log_weights`` is ``(N,)``.  The error is the
    delta-method standard error of the ratio estimator for independent samples,
    Var(Ô) ≈ Σ_i w_i² (O_i − Ô)² / (Σ_i w_i)², the linearisation of Ô = mean(wO)/mean(w).
    For autocorrelated samples (e.g. a Markov chain) use instead
    ``gamma_method(np.column_stack([w * O, w]), derived=lambda m: m[0] / m[1])``.
    """
    values = np.asarray(values, dtype=float)
    lw = np.asarray(log_weights, dtype=float)
    if lw.ndim != 1 or len(values) != lw.size:
        raise ValueError(f"log_weights must have shape ({len(values)},), got {lw.shape}")
    w = np.exp(lw - logsumexp(lw))
    value = w @ values
    error = np.sqrt(w**2 @ (values - value) ** 2)
    return ReweightedMean(value[()], error[()], ess(lw))


def pareto_k(log_weight: ArrayLike, size: int | None = None) -> float | None:
    """Tail index k̂ of the largest importance weights (the PSIS diagnostic of Vehtari et al.,
    arXiv:1507.02646): a generalized Pareto fit to the exceedances of the M = min(N/5, 3√N)
    largest weights over the next one, by the profile-likelihood quadrature of Zhang & Stephens
    (Technometrics 51 (2009) 316) with the weak prior of the PSIS reference code.

    ``size``: N, when ``log_weight`` holds only the largest log weights of N draws (a running
    tail); M is then also at most ``len(log_weight) − 1``. Default: ``len(log_weight)``.

    The weights have finite variance only for k < 1/2 and the estimate's error converges at the
    usual rate only then; for k̂ > 0.7 the sample is too heavy-tailed for the mean to be
    estimated reliably at practical N. None when there are fewer than 5 tail draws or the tail
    is degenerate (a quarter of the tail draws tie with the threshold to round-off, e.g.
    constant weights).
    """
    lw = np.sort(np.asarray(log_weight, dtype=float))
    n = lw.size if size is None else size
    m = int(min(n / 5, 3 * math.sqrt(n), lw.size - 1))
    if m < 5:
        return None
    top = lw[-1]
    x = np.sort(np.exp(lw[-m:] - top) - math.exp(lw[-m - 1] - top))   # largest weight: 1
    if x[int(m / 4 + 0.5) - 1] <= ROUND_OFF:
        return None
    return _generalized_pareto_shape(x)


def _generalized_pareto_shape(x: np.ndarray) -> float:
    """Shape ξ of a generalized Pareto fit to sorted exceedances ``x`` >= 0 (Zhang & Stephens).

    With θ = −ξ/σ the likelihood maximised over ξ gives ξ(θ) = mean log(1 − θx) and the profile
    log-likelihood n (log(−θ/ξ(θ)) − ξ(θ) − 1); θ̂ is its likelihood-weighted mean over a grid.
    """
    n = x.size
    grid_size = 30 + int(math.sqrt(n))
    quartile = x[int(n / 4 + 0.5) - 1]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(grid_size / (np.arange(1, grid_size + 1) - 0.5))) / (
        3.0 * quartile)
    xi = np.log1p(-theta[:, None] * x).mean(axis=1)
    profile = n * (np.log(-theta / xi) - xi - 1.0)
    weights = np.exp(profile - logsumexp(profile))
    xi_hat = float(np.log1p(-np.sum(weights * theta) * x).mean())
    return (n * xi_hat + 10 * 0.5) / (n + 10)   # weak prior pulling ξ towards 1/2
