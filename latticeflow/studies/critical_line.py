"""A line of constant physics for φ⁴: λ(L) at fixed m² such that m_p·L = 4, measured with HMC.

For each lattice size the pole mass m_p is read off the zero-momentum connected correlator
C(t) = Σ_{y⃗} G_c(t, y⃗) (t along axis 0) of an HMC ensemble: for a single state on the periodic
lattice, C(t) ∝ cosh(m_p(t − L/2)), so the effective mass m_eff(t) = arccosh[(C(t−1) + C(t+1))
/ 2C(t)] equals m_p at every t; it is averaged over the window t = max(1, L/8) … max(2, L/4),
where excited states have decayed (m_p·t ≥ ½ on the line) and the signal is still clean.
Errors: jackknife over blocks of trajectories (the chains are averaged per trajectory first;
blocks are at least 5 τ_int(m²) long, with at least 4 blocks: a run shorter than 20 τ_int has a
rough error, and the Γ-method then warns).

λ* is found by running HMC at three λ around a guess, fitting m_p·L linearly in λ by weighted
least squares and solving fit(λ*) = 4; the error of λ* comes from the fit's covariance.
HMC settings: ``n_chains`` vectorised chains, trajectory length τ = max(1, L/8) (the slowest
mode has frequency √2·m_p = 4√2/L, so τ ~ L/8 is a fraction of its period), step size tuned to
80 % acceptance during thermalisation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from latticeflow.observables import magnetization, zero_momentum_correlator_per_config
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.statistics import gamma_method, jackknife
from latticeflow.theories.phi4 import Phi4

logger = logging.getLogger(__name__)

#: m_p·L on the line of constant physics.
TARGET_MPL = 4.0


@dataclass(frozen=True)
class PoleMass:
    """m_p at one (m², λ, L) with its jackknife error, and the HMC run that measured it."""

    m2: float
    lam: float
    L: int
    m_p: float
    error: float
    tau_int_m2: float
    acceptance: float
    trajectories: int
    chains: int
    seconds: float

    @property
    def mpl(self) -> float:
        return self.m_p * self.L


def mass_window(L: int) -> range:
    """The times t whose effective masses are averaged: max(1, L/8) … max(2, L/4)."""
    return range(max(1, L // 8), max(2, L // 4) + 1)


def pole_mass_from_series(series: np.ndarray, L: int, tau_int: float = 0.5,
                          max_blocks: int = 20) -> tuple[float, float]:
    """(m_p, error) from per-trajectory rows [m, C_full(0), …, C_full(L−1)] (``(T, L + 1)``):
    jackknife over blocks at least 5 τ_int long (``tau_int`` in trajectories), at most
    ``max_blocks`` and at least 4 of them."""
    window = np.array(list(mass_window(L)))

    def m_p(means: np.ndarray) -> float:
        c = means[1:] - L * means[0] ** 2    # Σ_{y⃗} <m>² = L1·<m>² on an L×L lattice
        arg = (c[window - 1] + c[window + 1]) / (2 * c[window])
        return float(np.mean(np.arccosh(np.maximum(arg, 1.0))))

    n_blocks = int(np.clip(len(series) // max(1.0, 5 * tau_int), 4, max_blocks))
    estimate = jackknife(m_p, series, n_blocks)
    return float(estimate.value), float(estimate.error)


def measure_pole_mass(m2: float, lam: float, L: int, *, trajectories: int, n_chains: int = 64,
                      n_therm: int = 200, seed: int = 0, dtype: str = "float64",
                      device: str = "cpu") -> PoleMass:
    """Run HMC at (m², λ) on L×L and measure m_p (module docstring)."""
    config = HMCConfig(step_size=0.2, trajectory_length=max(1.0, L / 8), n_chains=n_chains,
                       n_therm=n_therm, target_accept=0.8, dtype=dtype, device=device)
    sampler = HMCSampler(Phi4(m2, lam), (L, L), config, seed)
    start = time.perf_counter()
    sampler.thermalise()
    rows = []
    with torch.no_grad():
        for _ in range(trajectories):
            x = torch.from_numpy(sampler.advance(n_chains)["configs"])  # one sweep
            m = magnetization(x)
            rows.append(torch.cat([m.mean()[None], zero_momentum_correlator_per_config(x)
                                   .mean(0), (m * m).mean()[None]]).double().cpu().numpy())
    seconds = time.perf_counter() - start
    series = np.array(rows)
    tau = gamma_method(series[:, -1]).tau_int
    value, error = pole_mass_from_series(series[:, :-1], L, tau)
    return PoleMass(m2, lam, L, value, error, float(tau), sampler.acceptance_rate, trajectories,
                    n_chains, seconds)


@dataclass(frozen=True)
class CriticalPoint:
    """λ* with m_p(λ*)·L = 4 at this L, its error, and the measurements of the fit."""

    L: int
    m2: float
    lam: float
    error: float
    points: list[PoleMass]

    def to_dict(self) -> dict:
        return {"L": self.L, "m2": self.m2, "lam": self.lam, "error": self.error,
                "points": [asdict(p) | {"mpl": p.mpl} for p in self.points]}


def solve_line(points: list[PoleMass], target: float = TARGET_MPL) -> tuple[float, float]:
    """(λ*, error) from a weighted linear fit m_p·L = a + b λ through ``points``."""
    lam = np.array([p.lam for p in points])
    y = np.array([p.mpl for p in points])
    sigma = np.array([max(p.error * p.L, 1e-12) for p in points])
    design = np.stack([np.ones_like(lam), lam], axis=1) / sigma[:, None]
    covariance = np.linalg.inv(design.T @ design)
    a, b = covariance @ design.T @ (y / sigma)
    root = (target - a) / b
    gradient = np.array([-1 / b, -(target - a) / b**2])
    return float(root), float(math.sqrt(gradient @ covariance @ gradient))


def find_critical_lambda(L: int, m2: float, guess: float, spacing: float, *, trajectories: int,
                         n_chains: int = 64, seed: int = 0, dtype: str = "float64",
                         device: str = "cpu", max_rounds: int = 3) -> CriticalPoint:
    """Measure m_p at guess − spacing, guess, guess + spacing and solve for λ*; while λ* falls
    outside that bracket, measure again around λ* (at most ``max_rounds`` rounds; the solve
    uses the last round only, where the linear fit is good)."""
    for round_ in range(max_rounds):
        lams = (guess - spacing, guess, guess + spacing)
        points = [measure_pole_mass(m2, lam, L, trajectories=trajectories, n_chains=n_chains,
                                    seed=seed + 3 * round_ + i, dtype=dtype, device=device)
                  for i, lam in enumerate(lams)]
        lam, error = solve_line(points)
        logger.info("L = %d, round %d: λ* = %.4f ± %.4f from m_p·L = %s", L, round_ + 1, lam,
                    error, ", ".join(f"{p.mpl:.3f}" for p in points))
        if abs(lam - guess) <= spacing:
            break
        guess = lam
    return CriticalPoint(L, m2, lam, error, points)
