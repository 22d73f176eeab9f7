"""HMC: integrator properties (reversibility, ΔH = O(ε²), <e^{−ΔH}> = 1) and physics checks
against exact results (2D U(1) plaquette on a finite torus, free-field <φ²>)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import iv

from latticeflow.base.errors import LatticeflowError
from latticeflow.lattice import mod_2pi, plaquette
from latticeflow.samplers.hmc import (
    INTEGRATORS,
    HMCConfig,
    HMCSampler,
    kinetic_energy,
)
from latticeflow.theories import Action, Phi4, U1Wilson

THEORIES = {
    "phi4": (Phi4(m2=-1.0, lam=1.0), (6, 6)),
    "u1": (U1Wilson(beta=2.0), (6, 6)),
}


def _thermalised(action: Action, lattice: tuple[int, ...], n_chains: int = 32) -> torch.Tensor:
    sampler = HMCSampler(action, lattice, HMCConfig(n_chains=n_chains, n_therm=30), seed=3)
    sampler.thermalise()
    return sampler.configs


def _momenta(x: torch.Tensor, seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype)


def _per_chain(values: np.ndarray, n_chains: int) -> np.ndarray:
    """Rows are stored round-robin over chains: reshape to (n_sweeps, n_chains)."""
    return values.reshape(-1, n_chains)


def _mean_and_error(per_sweep_chain: np.ndarray) -> tuple[float, float]:
    """Mean and standard error from the means of the independent chains (this absorbs the
    autocorrelation within each chain)."""
    chain_means = per_sweep_chain.mean(axis=0)
    return float(chain_means.mean()), float(chain_means.std(ddof=1) / np.sqrt(len(chain_means)))


@pytest.mark.parametrize("integrator", sorted(INTEGRATORS))
@pytest.mark.parametrize("theory", sorted(THEORIES))
def test_integrator_is_reversible(theory: str, integrator: str) -> None:
    action, lattice = THEORIES[theory]
    x0 = _thermalised(action, lattice)
    p0 = _momenta(x0)
    integrate = INTEGRATORS[integrator]
    x1, p1 = integrate(x0, p0, action.force, 0.05, 20)
    assert (x1 - x0).abs().max() > 0.5          # it really moved
    x2, p2 = integrate(x1, -p1, action.force, 0.05, 20)
    assert torch.allclose(x2, x0, rtol=0, atol=1e-12)
    assert torch.allclose(-p2, p0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("integrator", sorted(INTEGRATORS))
@pytest.mark.parametrize("theory", sorted(THEORIES))
def test_energy_violation_scales_as_step_size_squared(theory: str, integrator: str) -> None:
    """At fixed τ = 1 a 2nd-order integrator has per-trajectory ΔH = c·ε² (1 + O(ε²)); the
    log-log slope of the rms ΔH over the same 32 (x, p) starts is therefore 2 up to relative
    corrections of order ε² ≲ 1/64 (measured: 1.99–2.02). |slope − 2| < 0.1 rejects a
    1st-order scheme (slope 1) or an inconsistent force (slope ≈ 0)."""
    action, lattice = THEORIES[theory]
    x0 = _thermalised(action, lattice)
    p0 = _momenta(x0)
    h0 = action(x0) + kinetic_energy(p0)
    steps = np.array([8, 16, 32, 64])
    rms = []
    for n in steps:
        x, p = INTEGRATORS[integrator](x0, p0, action.force, 1.0 / n, int(n))
        delta_h = action(x) + kinetic_energy(p) - h0
        rms.append(float(delta_h.pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(1.0 / steps), np.log(rms), 1)[0]
    assert abs(slope - 2.0) < 0.1, (slope, rms)
    assert rms[-1] < 1e-2


@pytest.mark.parametrize("integrator", sorted(INTEGRATORS))
@pytest.mark.parametrize("theory", sorted(THEORIES))
def test_mean_exp_minus_delta_h_is_one(theory: str, integrator: str) -> None:
    """In equilibrium <e^{−ΔH}> = 1 exactly for a reversible, volume-preserving integrator.
    Step sizes are large (acceptance ≈ 0.7–0.9) so that the identity is not trivially met.
    φ⁴ needs ~100 thermalisation trajectories from the hot start: a chain still relaxing has
    very negative ΔH and breaks the identity (seen with 30)."""
    action, lattice = THEORIES[theory]
    n_chains = 64
    steps = {("phi4", "leapfrog"): 1 / 4, ("phi4", "omelyan"): 1 / 3,
             ("u1", "leapfrog"): 1 / 4, ("u1", "omelyan"): 1 / 2}
    config = HMCConfig(step_size=steps[theory, integrator], trajectory_length=1.0,
                       integrator=integrator, n_chains=n_chains, n_therm=100)
    sampler = HMCSampler(action, lattice, config, seed=11)
    rows = sampler.advance(n_chains * 60)
    weights = _per_chain(np.exp(-rows["delta_H"]), n_chains)
    mean, error = _mean_and_error(weights)
    assert 0.6 < sampler.acceptance_rate < 0.95
    assert np.abs(rows["delta_H"]).mean() > 0.1
    assert abs(mean - 1.0) < 3 * error, (mean, error)


def _u1_mean_plaquette(beta: float, volume: int) -> float:
    """Exact <cos P> on a periodic 2D torus with ``volume`` plaquettes: Z = Σ_n I_n(β)^V, so
    <cos P> = (1/V) d ln Z/dβ = Σ_n I_n' I_n^{V−1} / Σ_n I_n^V with I_n' = (I_{n−1} + I_{n+1})/2.
    (The infinite-volume value I₁/I₀ differs by ~(I₁/I₀)^V relative, 4e-6 here.)"""
    n = np.arange(-40, 41)
    bessel = iv(n, beta)
    derivative = 0.5 * (iv(n - 1, beta) + iv(n + 1, beta))
    return float((derivative * bessel ** (volume - 1)).sum() / (bessel**volume).sum())


def test_u1_mean_plaquette_matches_exact_finite_volume_value() -> None:
    beta, lattice, n_chains = 1.0, (4, 4), 128
    exact = _u1_mean_plaquette(beta, 16)
    assert abs(exact - iv(1, beta) / iv(0, beta)) < 1e-5
    config = HMCConfig(step_size=0.2, n_chains=n_chains, n_therm=50, target_accept=0.8)
    sampler = HMCSampler(U1Wilson(beta), lattice, config, seed=21)
    rows = sampler.advance(n_chains * 100)
    configs = torch.from_numpy(rows["configs"])
    assert configs.min() >= 0 and configs.max() < 2 * np.pi      # links are kept wrapped
    plaq = torch.cos(plaquette(configs)).mean((1, 2)).numpy()
    mean, error = _mean_and_error(_per_chain(plaq, n_chains))
    # A fixed seed makes this deterministic; 4σ keeps a false alarm (p ≈ 6e-5) out of reach
    # for any seed, while a 2% error in β (Δ<cos P> ≈ 0.008 ≈ 8σ) is caught.
    assert error < 3e-3
    assert abs(mean - exact) < 4 * error, (mean, exact, error)
    np.testing.assert_allclose(rows["action"], -beta * 16 * plaq, rtol=1e-12)


def test_free_field_phi_squared_matches_lattice_propagator() -> None:
    """λ = 0, m² = 1 in the standard form S = Σ[Σ_μ(φ(x+μ̂)−φ(x))² + m²φ²] = ½ φᵀKφ with
    K(p) = 2(p̂² + m²), p̂² = Σ_μ 4 sin²(p_μ/2): <φ(x)²> = (1/V) Σ_p 1/K(p).
    τ = 1 puts the p = (π, 0) modes (ω = √(2(4 + 1)) ≈ π) at resonance; the default step jitter
    must take care of it."""
    lattice, n_chains = (8, 8), 64
    k = 2 * np.pi * np.arange(lattice[0]) / lattice[0]
    p_hat2 = (4 * np.sin(k / 2) ** 2)[:, None] + (4 * np.sin(k / 2) ** 2)[None, :]
    exact = float(np.mean(1.0 / (2 * (p_hat2 + 1.0))))
    config = HMCConfig(step_size=0.1, trajectory_length=1.0, n_chains=n_chains, n_therm=100)
    sampler = HMCSampler(Phi4(m2=1.0, lam=0.0), lattice, config, seed=4)
    rows = sampler.advance(n_chains * 150)
    phi2 = (rows["configs"] ** 2).mean((1, 2))
    mean, error = _mean_and_error(_per_chain(phi2, n_chains))
    assert error < 1e-3
    assert abs(mean - exact) < 4 * error, (mean, exact, error)
    # equipartition: <S> = V/2 for a Gaussian ½φᵀKφ
    s_mean, s_error = _mean_and_error(_per_chain(rows["action"], n_chains))
    assert abs(s_mean - 32.0) < 4 * s_error


def test_step_size_is_tuned_during_thermalisation_then_frozen() -> None:
    config = HMCConfig(step_size=0.02, n_chains=32, n_therm=60, target_accept=0.7)
    sampler = HMCSampler(U1Wilson(2.0), (6, 6), config, seed=2)
    sampler.advance(32)
    tuned = (sampler.step_size, sampler.n_steps)
    assert tuned[0] > 0.1                       # moved far away from the poor initial 0.02
    assert abs(tuned[0] * tuned[1] - 1.0) < 1e-12
    sampler.advance(32 * 50)
    assert (sampler.step_size, sampler.n_steps) == tuned
    assert 0.55 < sampler.acceptance_rate < 0.85


def test_rows_do_not_depend_on_how_they_are_requested() -> None:
    """Round-robin storage over 3 chains with save_every = 2: any split of the requests gives
    the same rows, chain i % 3 for row i."""
    def make() -> HMCSampler:
        config = HMCConfig(n_chains=3, n_therm=4, save_every=2, dtype="float64")
        return HMCSampler(Phi4(m2=-1.0, lam=1.0), (4, 4), config, seed=9)

    whole = make().advance(20)
    split = make()
    parts = [split.advance(k) for k in (7, 1, 0, 12)]
    for name, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), value)
    np.testing.assert_array_equal(whole["chain"], np.arange(20) % 3)
    assert split.n_trajectories == 2 * 7        # 7 sweeps of 2 trajectories


def test_mod_2pi_range() -> None:
    x = torch.tensor([-1e-300, -2 * np.pi, 7.0, 2 * np.pi, -3.0], dtype=torch.float64)
    y = mod_2pi(x)
    assert bool(((y >= 0) & (y < 2 * np.pi)).all())
    assert torch.allclose(torch.cos(y), torch.cos(x), atol=1e-15)


def test_config_validation_and_round_trip() -> None:
    config = HMCConfig(step_size=0.3, trajectory_length=1.0, integrator="omelyan", n_chains=2)
    assert HMCConfig.from_dict(config.to_dict()) == config
    assert config.discretise(0.3) == (1 / 3, 3)
    with pytest.raises(LatticeflowError, match="integrator"):
        HMCConfig(integrator="verlet")
    with pytest.raises(LatticeflowError, match="device"):
        HMCConfig(device="gpu0")
    with pytest.raises(LatticeflowError, match="n_chains"):
        HMCConfig(n_chains=2.0)
    with pytest.raises(LatticeflowError, match="unknown parameter"):
        HMCConfig.from_dict({"stepsize": 0.1})
