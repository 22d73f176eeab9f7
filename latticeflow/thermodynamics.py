"""Thermodynamics from trained flows: log Z, free energy, variational bounds and reweighting.

Conventions
-----------
* Z = ∫ dx e^{−S(x)} with the measure of the flow densities: Lebesgue, dφ per site (φ⁴) and dθ
  per link (U(1)). With x ~ q and log weights log w = −S − log q, E_q[w] = Z. For U(1) the
  Haar-normalised value (dθ/2π per link, Z(β=0) = 1) is log Z_haar = log Z − 2V log 2π, with V
  the number of sites (2V links), as in :func:`latticeflow.exact.u1_log_z`.
* ``log_z`` is the importance-sampling estimate log Ẑ = log((1/N) Σ_i w_i) over N independent
  flow draws, evaluated as a log-sum-exp. Its error is a jackknife over ``n_bins`` blocks of
  log mean w computed in log space (leave-one-block-out log-sum-exps from prefix/suffix
  accumulations, never a difference of large sums): a block holding a dominant weight moves
  its leave-out value by a lot, so heavy tails that show up in the sample show up in the error.
  log Ẑ is biased low by ≈ (1/ESS − 1)/(2N) (Jensen); below the trust threshold this is a small
  fraction of the error.
* ``ess`` is the normalised ESS (Σw)²/(N Σw²) ∈ (0, 1] and ``n_effective = ess · N``. Heavy
  tails that the sample did *not* reach cannot show up in any sample error; the sample ESS then
  overestimates the true one. Two diagnostics guard against that: the number of effective
  samples, and the tail index k̂ of the largest weights (:func:`~latticeflow.statistics.pareto_k`;
  w has a finite variance only for k < 1/2). A result with fewer than ``min_effective``
  (default 100) effective samples or with k̂ > ``max_pareto_k`` (default 0.7) is flagged
  untrustworthy (:attr:`LogZResult.warnings`, :attr:`LogZResult.trusted`): its value and error
  must not be quoted as a measurement.
* Bounds. KL(q‖p) ≥ 0 gives the reverse (ELBO) bound log Z ≥ E_q[log w]; KL(p‖q) ≥ 0 gives
  the forward (EUBO) bound log Z ≤ E_p[log w] = E_p[−S − log q], estimated with the flow's
  ``log_prob`` on configurations sampled from p (an HMC or neural-MCMC ensemble). The ELBO
  error is the naive standard error (iid draws); the EUBO error is the Γ-method error over the
  ensemble's chains (Markov chains are autocorrelated). The gap EUBO − ELBO measures the
  quality of the flow: it is KL(q‖p) + KL(p‖q).
* Per site: ``log_z_per_site = log Z / V`` and the free energy per site F/V = −log Z / V.
* Reweighting from the trained parameter point to a nearby one uses the same flow draws with
  log weights −S_new − log q (equivalently log w − ΔS, ΔS = S_new − S; for U(1) β → β + δβ,
  −ΔS = δβ Σ_x cos P(x)). Self-normalised means and errors come from
  :func:`latticeflow.statistics.reweighted_mean`. Reweighting is refused
  (:class:`~latticeflow.base.errors.LatticeflowError`) when the ESS of the new weights falls below
  ``min_ess`` (default 0.01) or below ``min_effective`` (default 50) effective samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.special import logsumexp
from torch import Tensor

from latticeflow import exact
from latticeflow import observables as obs
from latticeflow.base.errors import LatticeflowError
from latticeflow.flows import Flow
from latticeflow.flows.samples import FlowSamples, log_weight
from latticeflow.statistics import (
    ROUND_OFF,
    Estimate,
    ReweightedMean,
    ShortChainWarning,
    ess,
    gamma_method,
    pareto_k,
    reweighted_mean,
)
from latticeflow.theories import Action, Phi4, Phi4Hopping, U1Wilson, action_from_table

#: Blocks of the jackknife error of log Ẑ.
DEFAULT_BINS = 100
#: Fewer effective samples than this flag a log Z estimate as untrustworthy.
MIN_EFFECTIVE = 100
#: A Pareto tail index k̂ of the weights above this flags a log Z estimate as untrustworthy.
MAX_PARETO_K = 0.7
#: Reweighting is refused below this normalised ESS ...
REWEIGHT_MIN_ESS = 0.01
#: ... or below this many effective samples.
REWEIGHT_MIN_EFFECTIVE = 50
#: The IS estimate is inconsistent with the forward bound when above it by this many errors.
BOUND_SIGMAS = 3.0

#: A per-configuration measurement: batch ``(B, *field_shape)`` → ``(B,)``.
Measurement = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Drawing from the flow, evaluating it on given configurations
# --------------------------------------------------------------------------------------------


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def sample_flow(flow: Flow, action: Action, n: int, *, batch_size: int = 1024,
                generator: torch.Generator | None = None,
                measurements: Mapping[str, Measurement] | None = None) -> FlowSamples:
    """Draw ``n`` configurations x ~ q in batches (no graph) and record log q, S and
    ``measurements`` of each; nothing of the configurations themselves is kept."""
    if n < 1 or batch_size < 1:
        raise LatticeflowError(f"need n >= 1 and batch_size >= 1, got n = {n}, "
                               f"batch_size = {batch_size}")
    measurements = dict(measurements or {})
    log_q: list[np.ndarray] = []
    s: list[np.ndarray] = []
    columns: dict[str, list[np.ndarray]] = {name: [] for name in measurements}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x, log_q_x = flow.sample(min(batch_size, n - start), generator=generator)
            log_q.append(_numpy(log_q_x))
            s.append(_numpy(action(x)))
            for name, measure in measurements.items():
                columns[name].append(_numpy(measure(x)))
    return FlowSamples(x=None, log_q=np.concatenate(log_q), action=np.concatenate(s),
                       measurements={name: np.concatenate(c) for name, c in columns.items()})


def log_weights_on(flow: Flow, action: Action, configs: ArrayLike | Tensor, *,
                   batch_size: int = 1024) -> np.ndarray:
    """log w = −S(x) − log q(x) on given configurations ``(N, *field_shape)`` (e.g. an HMC
    ensemble), with q from the flow's inverse, in batches without a graph."""
    configs = torch.as_tensor(configs)
    parts = []
    with torch.no_grad():
        for start in range(0, len(configs), batch_size):
            x = configs[start:start + batch_size].to(device=flow.device, dtype=flow.dtype)
            parts.append(_numpy(log_weight(action(x), flow.log_prob(x))))
    return np.concatenate(parts) if parts else np.zeros(0)


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


def log_mean_exp(log_weight: ArrayLike, n_bins: int = DEFAULT_BINS) -> Estimate:
    """log((1/N) Σ w_i) from log weights ``(N,)``, with a jackknife error over ``n_bins`` blocks
    of b = N // n_bins draws (n_bins at most N; the last N mod n_bins draws count in the value
    but in no block).

    Everything is done in log space: block j's leave-out value is
    logsumexp(blocks ≠ j) − log((n_bins − 1) b), from prefix and suffix log-add-exp
    accumulations; error² = (n_bins − 1)/n_bins Σ_j (leave-out_j − their mean)².
    """
    lw = np.asarray(log_weight, dtype=float)
    if lw.ndim != 1 or lw.size < 2:
        raise LatticeflowError(f"log mean w needs at least 2 log weights, got shape {lw.shape}")
    if not np.all(np.isfinite(lw)):
        raise LatticeflowError("non-finite log weights (a flow sample with S or log q = ±inf "
                               "or NaN)")
    value = float(logsumexp(lw) - math.log(lw.size))
    n_bins = min(n_bins, lw.size)
    if n_bins < 2:
        raise LatticeflowError(f"the jackknife needs at least 2 blocks, got {n_bins}")
    size = lw.size // n_bins
    blocks = logsumexp(lw[:n_bins * size].reshape(n_bins, size), axis=1)
    prefix = np.concatenate([[-np.inf], np.logaddexp.accumulate(blocks)[:-1]])
    suffix = np.concatenate([np.logaddexp.accumulate(blocks[::-1])[-2::-1], [-np.inf]])
    leave_out = np.logaddexp(prefix, suffix) - math.log((n_bins - 1) * size)
    spread = leave_out - leave_out.mean()
    return Estimate(value, float(np.sqrt((n_bins - 1) / n_bins * np.sum(spread**2))))


def reverse_bound(log_weight: ArrayLike) -> Estimate:
    """ELBO = E_q[log w] ≤ log Z from independent flow draws; error: standard error."""
    lw = np.asarray(log_weight, dtype=float)
    return Estimate(float(lw.mean()), float(lw.std(ddof=1) / math.sqrt(lw.size)))


@dataclass(frozen=True)
class ForwardBound:
    """EUBO = E_p[−S − log q] ≥ log Z over an ensemble of p, with its Γ-method error;
    ``warnings``: the Γ-method's short-chain warnings (the error is then unreliable)."""

    value: float
    error: float
    n: int
    warnings: tuple[str, ...] = ()


def forward_bound(log_weight_chains: Sequence[ArrayLike]) -> ForwardBound:
    """The forward bound from log w = −S − log q on the configurations of each Markov chain of
    an ensemble of p (one array per chain, in Markov order), chains combined as replicas."""
    chains = [np.asarray(c, dtype=float) for c in log_weight_chains]
    joined = np.concatenate(chains)
    if np.ptp(joined) <= ROUND_OFF * max(1.0, float(np.abs(joined).max())):
        # q = p: log w is constant up to round-off, whose "autocorrelation" means nothing
        return ForwardBound(float(joined.mean()), 0.0, joined.size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShortChainWarning)
        result = gamma_method(chains)
    notes = tuple(f"forward bound: {w.message}" for w in caught
                  if issubclass(w.category, ShortChainWarning))
    return ForwardBound(result.value, result.error, result.n, notes)


def haar_offset(action: Action, lattice: Sequence[int]) -> float | None:
    """log Z_lebesgue − log Z_haar = 2V log 2π for U(1) (V sites, 2V links); None otherwise."""
    if action.theory != "u1":
        return None
    return 2 * math.prod(lattice) * math.log(2 * math.pi)


@dataclass(frozen=True)
class LogZResult:
    """log Z of a theory from N independent flow draws (conventions: module docstring).

    ``log_z`` ± ``log_z_error``: importance-sampling estimate (Lebesgue measure) and jackknife
    error; ``log_z_per_site`` = log Z / V; ``log_z_haar``: the Haar-normalised value (U(1) only);
    ``ess`` (normalised) and ``n_effective = ess · n``; ``pareto_k``: tail index k̂ of the
    weights (:func:`pareto_k`); ``elbo`` ± ``elbo_error``: reverse
    bound; ``eubo`` ± ``eubo_error``: forward bound when an ensemble of p was given;
    ``warnings``: why the estimate should not be trusted (empty when it may be).
    """

    log_z: float
    log_z_error: float
    log_z_per_site: float
    log_z_haar: float | None
    ess: float
    n_effective: float
    pareto_k: float | None
    elbo: float
    elbo_error: float
    eubo: float | None
    eubo_error: float | None
    n: int
    volume: int
    n_bins: int
    warnings: tuple[str, ...]

    @property
    def log_z_per_site_error(self) -> float:
        return self.log_z_error / self.volume

    @property
    def free_energy_per_site(self) -> float:
        """F/V = −log Z / V."""
        return -self.log_z_per_site

    @property
    def trusted(self) -> bool:
        return not self.warnings

    def as_dict(self) -> dict[str, Any]:
        """All fields plus ``log_z_per_site_error``, ``free_energy_per_site`` and ``trusted``."""
        return {**asdict(self), "warnings": list(self.warnings),
                "log_z_per_site_error": self.log_z_per_site_error,
                "free_energy_per_site": self.free_energy_per_site, "trusted": self.trusted}


def estimate_log_z(log_weight: ArrayLike, action: Action, lattice: Sequence[int], *,
                   forward: ForwardBound | None = None, n_bins: int = DEFAULT_BINS,
                   min_effective: float = MIN_EFFECTIVE, max_pareto_k: float = MAX_PARETO_K
                   ) -> LogZResult:
    """log Z, its error, ESS and bounds from log w = −S − log q of independent flow draws.

    Flagged untrustworthy: fewer than ``min_effective`` effective samples, or a Pareto tail
    index k̂ (:func:`pareto_k`) above ``max_pareto_k``. ``forward``: the forward bound from an
    ensemble of p (:func:`forward_bound`), included in the result and used as a consistency
    check (log Ẑ above it by more than ``BOUND_SIGMAS`` combined errors is flagged).
    """
    lw = np.asarray(log_weight, dtype=float)
    value, error = log_mean_exp(lw, n_bins)
    volume = math.prod(lattice)
    n_effective = ess(lw) * lw.size
    tail_index = pareto_k(lw)
    elbo = reverse_bound(lw)
    offset = haar_offset(action, lattice)
    notes = (_tail_warnings(n_effective, tail_index, min_effective, max_pareto_k)
             + _bound_warnings(value, error, forward))
    return LogZResult(
        log_z=value, log_z_error=error, log_z_per_site=value / volume,
        log_z_haar=None if offset is None else value - offset, ess=n_effective / lw.size,
        n_effective=n_effective, pareto_k=tail_index, elbo=float(elbo.value),
        elbo_error=float(elbo.error), eubo=None if forward is None else forward.value,
        eubo_error=None if forward is None else forward.error, n=lw.size, volume=volume,
        n_bins=min(n_bins, lw.size), warnings=tuple(notes))


def _tail_warnings(n_effective: float, tail_index: float | None, min_effective: float,
                   max_pareto_k: float) -> list[str]:
    notes = []
    if n_effective < min_effective:
        notes.append(f"only {n_effective:.1f} effective samples (ESS · N < {min_effective:g}): "
                     f"the weights are dominated by a few draws, and the rare large weights "
                     f"that set log Z are probably unsampled; log Z and its error are not "
                     f"reliable (train the flow further or draw many more samples)")
    if tail_index is not None and tail_index > max_pareto_k:
        notes.append(f"heavy-tailed weights: Pareto k̂ = {tail_index:.2f} > {max_pareto_k:g}; "
                     f"the sample mean of w converges too slowly for log Z and its error to be "
                     f"reliable (train the flow further)")
    return notes


def _bound_warnings(value: float, error: float, forward: ForwardBound | None) -> list[str]:
    if forward is None:
        return []
    notes = list(forward.warnings)
    excess = (value - forward.value) / math.hypot(error, forward.error)
    if excess > BOUND_SIGMAS:
        notes.append(f"log Z estimate exceeds the forward bound by {excess:.1f}σ: the ensemble "
                     f"of p and the flow disagree (wrong or unthermalised ensemble, or another "
                     f"action)")
    return notes


# --------------------------------------------------------------------------------------------
# Reweighting
# --------------------------------------------------------------------------------------------


def shifted_action(action: Action, changes: Mapping[str, float]) -> Action:
    """The action with some parameters changed (``{"beta": 2.1}``, ``{"m2": -3.9}``,
    ``{"kappa": 0.28}``); only parameters of ``action``'s own card may change."""
    card = action.card()
    allowed = sorted(k for k, v in action.params().items() if isinstance(v, int | float))
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise LatticeflowError(f"cannot reweight {action!r} in {', '.join(unknown)}: its "
                               f"parameters are {', '.join(allowed)}")
    card.update({k: float(v) for k, v in changes.items()})
    return action_from_table(card, "reweighting target")


def reweight(values: ArrayLike, log_weights: ArrayLike, *, min_ess: float = REWEIGHT_MIN_ESS,
             min_effective: float = REWEIGHT_MIN_EFFECTIVE, target: str = "the target"
             ) -> ReweightedMean:
    """Self-normalised reweighted mean of ``values`` (``(N,)`` or ``(N, n_obs)``) with log
    weights ``(N,)`` of the target density (−S_new − log q, any additive constant).

    Raises :class:`LatticeflowError` when the ESS collapses: ESS < ``min_ess`` or
    ESS · N < ``min_effective``; ``target`` names the target in that message.
    """
    lw = np.asarray(log_weights, dtype=float)
    result = reweighted_mean(values, lw)
    n_effective = result.ess * lw.size
    if result.ess < min_ess or n_effective < min_effective:
        raise LatticeflowError(
            f"reweighting to {target} refused: ESS = {result.ess:.3g} ({n_effective:.1f} "
            f"effective samples of {lw.size}) is below the threshold (ESS >= {min_ess:g} and "
            f">= {min_effective:g} effective samples); choose a target closer to the trained "
            f"parameters, draw more samples, or train a better flow (or one at the target)")
    return result


# --------------------------------------------------------------------------------------------
# Observables and exact values
# --------------------------------------------------------------------------------------------


def _q_squared(links: Tensor) -> Tensor:
    return obs.round_charge(obs.topological_charge(links)).square()


def _m_squared(phi: Tensor) -> Tensor:
    return obs.magnetization(phi).square()


def _abs_m(phi: Tensor) -> Tensor:
    return obs.magnetization(phi).abs()


def observables_for(theory: str) -> dict[str, Measurement]:
    """Per-configuration observables to reweight, named as in :mod:`latticeflow.measure`:
    U(1) ``plaquette`` (mean cos P) and ``topological_charge_squared`` (Q rounded, squared);
    φ⁴ ``magnetization_squared`` (m²) and ``abs_magnetization`` (|m|), m = (1/V) Σ_x φ(x)."""
    if theory == "u1":
        return {"plaquette": obs.plaquette_mean, "topological_charge_squared": _q_squared}
    if theory == "phi4":
        return {"magnetization_squared": _m_squared, "abs_magnetization": _abs_m}
    return {}


def _free_field(action: Action, d: int) -> tuple[float, float] | None:
    """(m², κ) of a free field (κ = 1 in the standard form: field φ/√κ), or None."""
    if isinstance(action, Phi4) and action.lam == 0.0 and action.m2 > 0.0:
        return action.m2, 1.0
    if isinstance(action, Phi4Hopping) and action.lam == 0.0 and 1.0 / action.kappa > 2 * d:
        return 1.0 / action.kappa - 2 * d, action.kappa
    return None


def exact_log_z(action: Action, lattice: Sequence[int]) -> float | None:
    """Exact log Z (Lebesgue measure) where known, else None: the free field (λ = 0, m² > 0;
    the hopping form maps by φ = √κ ϕ, so log Z_hop = log Z(m² = 1/κ − 2d) − (V/2) log κ) and
    2D U(1) (:func:`latticeflow.exact.u1_log_z`)."""
    lattice = tuple(int(n) for n in lattice)
    if isinstance(action, U1Wilson):
        return exact.u1_log_z(action.beta, lattice, measure="lebesgue") if len(
            lattice) == 2 else None
    free = _free_field(action, len(lattice))
    if free is None:
        return None
    m2, kappa = free
    return exact.free_log_z(lattice, m2) - 0.5 * math.prod(lattice) * math.log(kappa)


__all__ = ["DEFAULT_BINS", "MIN_EFFECTIVE", "REWEIGHT_MIN_EFFECTIVE", "REWEIGHT_MIN_ESS",
           "MAX_PARETO_K", "FlowSamples", "ForwardBound", "LogZResult", "Measurement",
           "estimate_log_z", "exact_log_z", "forward_bound", "haar_offset", "log_mean_exp",
           "log_weights_on", "observables_for", "pareto_k", "reverse_bound", "reweight",
           "sample_flow", "shifted_action"]
