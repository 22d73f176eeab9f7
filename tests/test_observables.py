"""Checks of latticeflow.observables: hand-computed values, symmetries, exact free-field limits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import special

from latticeflow import exact, observables
from latticeflow.lattice import gauge_transform, plaquette, shift
from latticeflow.theories import Phi4

# --------------------------------------------------------------------------------------------
# Scalar field
# --------------------------------------------------------------------------------------------

TINY = torch.tensor(
    [
        [[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]],
        [[-2.0, 1.0, 1.0], [0.0, -1.0, 2.0]],
    ],
    dtype=torch.float64,
)  # (B=2, L0=2, L1=3)


def loop_correlator(field: np.ndarray) -> np.ndarray:
    """(1/V) Σ_x φ(x)φ(x+y) by explicit loops, for one 2D configuration."""
    l0, l1 = field.shape
    out = np.zeros((l0, l1))
    for y0, y1, x0, x1 in itertools.product(range(l0), range(l1), range(l0), range(l1)):
        out[y0, y1] += field[x0, x1] * field[(x0 + y0) % l0, (x1 + y1) % l1]
    return out / (l0 * l1)


def test_correlators_on_tiny_field_by_hand():
    fields = TINY.numpy()
    full = np.stack([loop_correlator(f) for f in fields])
    np.testing.assert_allclose(observables.correlator_per_config(TINY).numpy(), full, atol=1e-14)

    m = fields.mean(axis=(1, 2))
    np.testing.assert_allclose(observables.magnetization(TINY).numpy(), m, atol=1e-15)
    g_c = full.mean(0) - m.mean() ** 2
    np.testing.assert_allclose(observables.connected_correlator(TINY).numpy(), g_c, atol=1e-14)
    # first config by hand: G(0,0) = Σφ²/6, G(1,0) = Σ_x φ(x)φ(x+0̂)/6
    assert full[0, 0, 0] == pytest.approx((1 + 4 + 1 + 0.25 + 0 + 9) / 6)
    assert full[0, 1, 0] == pytest.approx(2 * (1 * 0.5 + 2 * 0 + -1 * 3) / 6)

    c = g_c.sum(axis=1)
    np.testing.assert_allclose(observables.zero_momentum_correlator(TINY).numpy(), c, atol=1e-14)
    c_full = observables.zero_momentum_correlator_per_config(TINY)
    volume, l0 = 6, 2
    np.testing.assert_allclose(
        (c_full.mean(0) - volume / l0 * torch.tensor(m.mean()) ** 2).numpy(), c, atol=1e-14
    )


def test_susceptibility_conventions():
    phi = torch.randn(64, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    phi = phi + 0.3  # a non-zero mean, so the disconnected part matters
    chi = observables.susceptibility(phi)
    assert chi.item() == pytest.approx(observables.connected_correlator(phi).sum().item(), 1e-12)
    m = observables.magnetization(phi)
    expected = 24 * (m.square().mean() - m.abs().mean() ** 2)
    assert observables.susceptibility(phi, absolute=True).item() == pytest.approx(expected.item())
    assert observables.susceptibility(phi, absolute=True) < chi


def test_connect_broadcasts_over_resamples():
    g = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    m = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = observables.connect(g, m)
    assert torch.equal(out[0], g[0] - 1.0) and torch.equal(out[1], g[1] - 4.0)
    assert torch.equal(observables.connect(g[0], torch.tensor(3.0)), g[0] - 9.0)


def test_binder_cumulant_limits():
    # m = ±c on every configuration: <m⁴> = <m²>², U = 2/3
    phi = torch.ones(10, 3, 3) * torch.tensor([1.0, -1.0]).repeat(5).view(10, 1, 1) * 0.7
    assert observables.binder_cumulant_batch(phi).item() == pytest.approx(2 / 3, rel=1e-6)
    assert observables.binder_cumulant(torch.tensor(2.0), torch.tensor(12.0)).item() == 0.0


def test_action_density():
    phi = torch.randn(3, 4, 4, dtype=torch.float64)
    action = Phi4(-1.0, 0.5)
    torch.testing.assert_close(observables.action_density(phi, action), action(phi) / 16)


@pytest.mark.parametrize("m2,shape", [(1.0, (16, 4)), (0.09, (40, 3)), (2.0, (7, 5, 2))])
def test_effective_mass_of_exact_free_correlator(m2, shape):
    """Free C(t) is exactly ∝ cosh(E(t − L0/2)) with cosh E = 1 + m²/2 (see exact module doc)."""
    c = torch.from_numpy(exact.free_zero_momentum_correlator(shape, m2))
    m_eff = observables.effective_mass(c)
    assert m_eff.shape == (shape[0] - 2,)
    expected = torch.full_like(m_eff, exact.free_mass(m2))
    torch.testing.assert_close(m_eff, expected, rtol=1e-9, atol=0)
    assert exact.free_mass(m2) != pytest.approx(math.sqrt(m2), rel=1e-3)  # lattice ≠ continuum


def test_effective_mass_hand_values():
    e = 0.4
    c = torch.cosh(e * (torch.arange(10, dtype=torch.float64) - 5))
    torch.testing.assert_close(observables.effective_mass(c), torch.full((8,), e, dtype=c.dtype))
    batched = observables.effective_mass(torch.stack([c, 2 * c]))
    assert batched.shape == (2, 8)


@pytest.mark.parametrize("m2,shape", [(0.5, (8, 8)), (0.1, (12, 6))])
def test_second_moment_xi_of_exact_free_field(m2, shape):
    """G̃(p) = 1/(2(p̂² + m²)) exactly, so ξ₂ = 1/m on any lattice."""
    g = torch.from_numpy(exact.free_two_point(shape, m2))
    for axis in (0, 1):
        g0, gp = observables.momentum_correlator(g, axis)
        xi = observables.second_moment_correlation_length(g0, gp, shape[axis])
        assert xi.item() == pytest.approx(1 / math.sqrt(m2), rel=1e-10)
    assert g0.item() == pytest.approx(exact.free_susceptibility(shape, m2), rel=1e-12)


def test_scalar_observables_keep_dtype():
    phi = torch.randn(4, 6, 5, dtype=torch.float32)
    for out in (
        observables.magnetization(phi),
        observables.correlator_per_config(phi),
        observables.connected_correlator(phi),
        observables.susceptibility(phi),
        observables.zero_momentum_correlator(phi),
        observables.correlation_length(phi + 3.0),
    ):
        assert out.dtype == torch.float32 and out.device == phi.device
    assert observables.zero_momentum_correlator(phi).shape == (6,)


# --------------------------------------------------------------------------------------------
# U(1)
# --------------------------------------------------------------------------------------------


def random_links(shape, batch=32, scale=3.0, dtype=torch.float64, seed=0):
    """Rough links: uniform in (−scale·π, scale·π], far from smooth, many topological sectors."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 2, *shape, generator=gen, dtype=dtype) * 2 - 1) * scale * math.pi


def flux_links(shape, q):
    """A constant-field configuration: every plaquette angle ≡ a = 2πq/V (mod 2π)."""
    l0, l1 = shape
    a = 2 * math.pi * q / (l0 * l1)
    x0 = torch.arange(l0, dtype=torch.float64).view(l0, 1).expand(l0, l1)
    x1 = torch.arange(l1, dtype=torch.float64).view(1, l1).expand(l0, l1)
    theta1 = a * x0
    theta0 = torch.where(x0 == l0 - 1, -a * l0 * x1, torch.zeros_like(x1))
    return torch.stack([theta0, theta1]).unsqueeze(0), a


@pytest.mark.parametrize("shape", [(2, 2), (3, 5), (8, 8), (16, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_topological_charge_is_integer(shape, dtype, tol):
    links = random_links(shape, batch=256, dtype=dtype)
    q = observables.topological_charge(links)
    assert q.dtype == dtype
    assert torch.all((q - observables.round_charge(q)).abs() < tol)
    assert len(torch.unique(observables.round_charge(q))) >= 2  # several sectors: not trivially 0


@pytest.mark.parametrize("shape", [(4, 4), (6, 4)])
def test_gauge_invariance(shape):
    links = random_links(shape)
    alpha = (torch.rand(links.shape[0], *shape, dtype=links.dtype) * 2 - 1) * 10.0
    rotated = gauge_transform(links, alpha)
    assert not torch.allclose(rotated, links)
    q0, q1 = observables.topological_charge(links), observables.topological_charge(rotated)
    assert torch.equal(observables.round_charge(q0), observables.round_charge(q1))
    torch.testing.assert_close(
        observables.plaquette_mean(rotated), observables.plaquette_mean(links)
    )
    for r, t in [(1, 1), (2, 1), (1, 2), (shape[0] // 2, shape[1] // 2)]:
        torch.testing.assert_close(
            observables.wilson_loop(rotated, r, t), observables.wilson_loop(links, r, t)
        )


def test_wilson_loop_equals_enclosed_plaquettes():
    """Stokes: the loop phase is Σ P over the R×T enclosed plaquettes (mod 2π)."""
    links = random_links((6, 8), batch=8)
    p = plaquette(links)
    for r, t in [(1, 1), (2, 3), (3, 4), (3, 1)]:
        enclosed = sum(shift(shift(p, 0, i), 1, j) for i in range(r) for j in range(t))
        torch.testing.assert_close(
            observables.wilson_loop(links, r, t), torch.cos(enclosed).mean((1, 2))
        )
    torch.testing.assert_close(
        observables.wilson_loop(links, 1, 1), observables.plaquette_mean(links)
    )


@pytest.mark.parametrize("shape,q", [((4, 4), 1), ((6, 5), -2), ((8, 8), 3)])
def test_constant_flux_configuration(shape, q):
    links, a = flux_links(shape, q)
    assert observables.topological_charge(links).item() == pytest.approx(q, abs=1e-10)
    assert observables.plaquette_mean(links).item() == pytest.approx(math.cos(a), abs=1e-12)
    table = observables.wilson_loop_table(links, shape[0] // 2, shape[1] // 2)
    for r in range(shape[0] // 2 + 1):
        for t in range(shape[1] // 2 + 1):
            assert table[0, r, t].item() == pytest.approx(math.cos(r * t * a), abs=1e-12)


def test_wilson_loop_size_limits():
    links = random_links((4, 6), batch=2)
    with pytest.raises(ValueError):
        observables.wilson_loop(links, 3, 1)
    with pytest.raises(ValueError):
        observables.wilson_loop(links, 1, 0)


def test_creutz_ratio_area_law():
    beta = 1.5
    w = torch.tensor(
        [[exact.u1_wilson_loop_infinite(beta, r, t) for t in range(4)] for r in range(4)],
        dtype=torch.float64,
    )
    chi = observables.creutz_ratio_table(w)
    sigma = -math.log(special.iv(1, beta) / special.iv(0, beta))
    torch.testing.assert_close(chi, torch.full((3, 3), sigma, dtype=torch.float64))
    perimeter = torch.tensor(
        [[math.exp(-0.3 * (r + t)) for t in range(4)] for r in range(4)], dtype=torch.float64
    )
    # a pure perimeter law has zero Creutz ratio; the scalar form agrees with the table
    zeros = torch.zeros(3, 3, dtype=torch.float64)
    torch.testing.assert_close(observables.creutz_ratio_table(perimeter), zeros, atol=1e-14, rtol=0)
    assert observables.creutz_ratio(w[2, 3], w[1, 2], w[2, 2], w[1, 3]).item() == pytest.approx(
        chi[1, 2].item()
    )
