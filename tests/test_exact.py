"""Checks of latticeflow.exact against dense linear algebra, brute-force integration and MC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from latticeflow import exact, observables
from latticeflow.theories import Phi4

# --------------------------------------------------------------------------------------------
# Free field
# --------------------------------------------------------------------------------------------


def dense_kernel(shape: tuple[int, ...], m2: float) -> np.ndarray:
    """K = 2(−Δ + m²) built column by column from periodic shifts of unit vectors."""
    volume = math.prod(shape)
    k = np.zeros((volume, volume))
    for i in range(volume):
        e = np.zeros(volume)
        e[i] = 1.0
        f = e.reshape(shape)
        lap = sum(np.roll(f, 1, a) + np.roll(f, -1, a) - 2 * f for a in range(len(shape)))
        k[:, i] = (2 * (-lap + m2 * f)).ravel()
    return k


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 5), (7,), (2, 2)])
def test_free_kernel_matches_phi4_action(shape):
    m2 = 0.7
    k = dense_kernel(shape, m2)
    phi = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    flat = phi.reshape(5, -1).numpy()
    quad_form = 0.5 * np.einsum("bi,ij,bj->b", flat, k, flat)
    np.testing.assert_allclose(quad_form, Phi4(m2, 0.0)(phi).numpy(), rtol=1e-12)


@pytest.mark.parametrize("shape,m2", [((4, 6), 1.0), ((3, 2, 5), 0.3), ((5,), 2.5)])
def test_free_two_point_is_inverse_kernel(shape, m2):
    inv = np.linalg.inv(dense_kernel(shape, m2))
    g = exact.free_two_point(shape, m2)
    np.testing.assert_allclose(g.ravel(), inv[0], rtol=1e-12, atol=1e-14)
    # translation invariance: row of site y is G(x − y)
    y = tuple(n - 1 for n in shape)
    shifted = np.roll(g, y, axis=tuple(range(len(shape))))
    np.testing.assert_allclose(shifted.ravel(), inv[np.ravel_multi_index(y, shape)], atol=1e-14)


def test_free_susceptibility_and_zero_momentum():
    shape, m2 = (4, 6), 0.4
    inv = np.linalg.inv(dense_kernel(shape, m2))
    g = inv[0].reshape(shape)
    assert exact.free_susceptibility(shape, m2) == pytest.approx(g.sum(), rel=1e-12)
    assert exact.free_susceptibility(shape, m2) == pytest.approx(1 / (2 * m2), rel=1e-15)
    np.testing.assert_allclose(exact.free_zero_momentum_correlator(shape, m2), g.sum(1), rtol=1e-12)


@pytest.mark.parametrize("shape,m2", [((4, 6), 1.0), ((3, 3), 0.05), ((2, 3, 2), 4.0)])
def test_free_log_z_matches_dense_gaussian_integral(shape, m2):
    k = dense_kernel(shape, m2)
    sign, logdet = np.linalg.slogdet(k)
    assert sign > 0
    expected = 0.5 * k.shape[0] * math.log(2 * math.pi) - 0.5 * logdet
    assert exact.free_log_z(shape, m2) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_free_field_monte_carlo_matches_exact():
    """Exact Gaussian samples φ = L⁻ᵀz (K = LLᵀ) → batch estimates agree within 5σ."""
    shape, m2, n = (4, 6), 0.5, 40_000
    k = dense_kernel(shape, m2)
    chol = np.linalg.cholesky(k)
    z = np.random.default_rng(7).standard_normal((k.shape[0], n))
    phi = torch.from_numpy(np.linalg.solve(chol.T, z).T.reshape(n, *shape).copy())

    g_exact = exact.free_two_point(shape, m2)
    g_i = observables.correlator_per_config(phi)
    sigma = g_i.std(0).numpy() / math.sqrt(n)
    g_c = observables.connected_correlator(phi).numpy()
    assert np.all(np.abs(g_c - g_exact) < 5 * sigma)

    volume = math.prod(shape)
    m = observables.magnetization(phi)
    chi_sigma = volume * m.square().std().item() / math.sqrt(n)
    chi = observables.susceptibility(phi).item()
    assert abs(chi - exact.free_susceptibility(shape, m2)) < 5 * chi_sigma

    # Binder cumulant of a Gaussian magnetisation is 0; jackknife error over 20 blocks.
    blocks = m.reshape(20, -1)
    m2b, m4b = blocks.square().mean(1), blocks.pow(4).mean(1)
    jack = observables.binder_cumulant((m2b.sum() - m2b) / 19, (m4b.sum() - m4b) / 19)
    err = math.sqrt(19 / 20 * ((jack - jack.mean()) ** 2).sum().item())
    assert abs(observables.binder_cumulant_batch(phi).item()) < 5 * err


def test_free_field_rejects_nonpositive_mass():
    with pytest.raises(ValueError):
        exact.free_two_point((4, 4), 0.0)


# --------------------------------------------------------------------------------------------
# U(1): brute force on tiny tori.
# Haar measure on the links pushes forward to Haar measure on the plaquette angles subject to
# Π e^{iP} = 1 (the map links → plaquettes is a surjective homomorphism onto that subgroup), so for
# V plaquettes one integrates φ_1..φ_{V−1} uniformly on (−π, π] and P_V = −Σφ. Q = round(s/2π)
# with s = Σ_{x<V} φ_x. The integrands are smooth on the polyhedral pieces, so scipy's adaptive
# quadrature reaches ~1e-11 relative; tolerances below are 1e-8.
# --------------------------------------------------------------------------------------------


def brute_v3(beta: float) -> tuple[float, float, float]:
    """(log Z, <cos P>, <Q²>) on a 3×1 torus by 2D quadrature."""

    def weight(p2, p1):
        return math.exp(beta * (math.cos(p1) + math.cos(p2) + math.cos(p1 + p2)))

    def cos_weight(p2, p1):
        return (math.cos(p1) + math.cos(p2) + math.cos(p1 + p2)) / 3 * weight(p2, p1)

    opts = {"epsabs": 1e-13, "epsrel": 1e-12}
    norm = (2 * math.pi) ** 2
    z = integrate.dblquad(weight, -math.pi, math.pi, -math.pi, math.pi, **opts)[0] / norm
    c = integrate.dblquad(cos_weight, -math.pi, math.pi, -math.pi, math.pi, **opts)[0] / norm
    # Q = ±1 where |φ1 + φ2| > π; the two signs contribute equally.
    q1 = integrate.dblquad(weight, 0, math.pi, lambda p1: math.pi - p1, math.pi, **opts)[0]
    return math.log(z), c / z, 2 * q1 / norm / z


def brute_v4(beta: float) -> tuple[float, float, float]:
    """(log Z, <cos P>, <Q²>) on a 2×2 torus by 3D quadrature."""

    def cos_sum(p3, p2, p1):
        return math.cos(p1) + math.cos(p2) + math.cos(p3) + math.cos(p1 + p2 + p3)

    def weight(p3, p2, p1):
        return math.exp(beta * cos_sum(p3, p2, p1))

    def cos_weight(p3, p2, p1):
        return cos_sum(p3, p2, p1) / 4 * weight(p3, p2, p1)

    opts = {"epsabs": 1e-12, "epsrel": 1e-11}
    pi = math.pi
    norm = (2 * pi) ** 3
    box = (-pi, pi, -pi, pi, -pi, pi)
    z = integrate.tplquad(weight, *box, **opts)[0] / norm
    c = integrate.tplquad(cos_weight, *box, **opts)[0] / norm
    # Q = 1 ⇔ s = φ1+φ2+φ3 > π (s ≤ 3π): φ1 free, φ2 > −φ1, φ3 > π − φ1 − φ2.
    q1 = integrate.tplquad(
        weight, -pi, pi, lambda p1: max(-pi, -p1), pi, lambda p1, p2: pi - p1 - p2, pi, **opts
    )[0]
    return math.log(z), c / z, 2 * q1 / norm / z


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.7, 3.0])
@pytest.mark.parametrize("shape,brute", [((3, 1), brute_v3), ((2, 2), brute_v4)])
def test_u1_exact_matches_brute_force(shape, brute, beta):
    log_z, plaq, q2 = brute(beta)
    assert exact.u1_log_z(beta, shape) == pytest.approx(log_z, rel=1e-8, abs=1e-10)
    assert exact.u1_mean_plaquette(beta, shape) == pytest.approx(plaq, rel=1e-8, abs=1e-10)
    assert exact.u1_mean_q2(beta, shape) == pytest.approx(q2, rel=1e-8, abs=1e-12)
    volume = shape[0] * shape[1]
    assert exact.u1_topological_susceptibility(beta, shape) == pytest.approx(q2 / volume, rel=1e-8)


@pytest.mark.parametrize("beta", [0.3, 2.0])
def test_u1_degenerate_tori(beta):
    """V = 1: P ≡ 0, Z = e^β. V = 2: P₂ = −P₁, Z = (1/2π)∫e^{2β cos φ} = I₀(2β). Q = 0 on both."""
    assert exact.u1_log_z(beta, (1, 1)) == pytest.approx(beta, rel=1e-13)
    assert exact.u1_mean_plaquette(beta, (1, 1)) == pytest.approx(1.0, rel=1e-13)
    assert exact.u1_log_z(beta, (2, 1)) == pytest.approx(math.log(special.iv(0, 2 * beta)), 1e-13)
    ratio = special.iv(1, 2 * beta) / special.iv(0, 2 * beta)
    assert exact.u1_mean_plaquette(beta, (1, 2)) == pytest.approx(ratio, rel=1e-13)
    assert exact.u1_mean_q2(beta, (1, 1)) == 0.0
    assert exact.u1_mean_q2(beta, (2, 1)) == 0.0


def test_u1_reduction_against_link_monte_carlo():
    """iid Haar links on 2×2, reweighted with e^{−S}: checks the plaquette reduction used above and
    the observables' Q against the exact <Q²> and <cos P> (5σ, delta-method ratio errors)."""
    beta, n = 0.5, 200_000
    gen = torch.Generator().manual_seed(3)
    links = (torch.rand(n, 2, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    w = torch.exp(4 * beta * observables.plaquette_mean(links))
    for obs, target in [
        (observables.topological_charge(links).square(), exact.u1_mean_q2(beta, (2, 2))),
        (observables.plaquette_mean(links), exact.u1_mean_plaquette(beta, (2, 2))),
    ]:
        est = (w * obs).sum() / w.sum()
        sigma = torch.sqrt(((w * (obs - est)) ** 2).sum()) / w.sum()
        assert abs(est.item() - target) < 5 * sigma.item()


@pytest.mark.parametrize("beta", [0.4, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("shape", [(3, 4), (8, 8)])
def test_u1_plaquette_is_log_z_derivative(beta, shape):
    h = 1e-4
    volume = shape[0] * shape[1]
    fd = (exact.u1_log_z(beta + h, shape) - exact.u1_log_z(beta - h, shape)) / (2 * h * volume)
    assert exact.u1_mean_plaquette(beta, shape) == pytest.approx(fd, rel=1e-7)


def test_u1_measures_and_zero_coupling():
    shape = (4, 5)
    assert exact.u1_log_z(0.0, shape) == 0.0
    assert exact.u1_mean_plaquette(0.0, shape) == 0.0
    diff = exact.u1_log_z(1.3, shape, "lebesgue") - exact.u1_log_z(1.3, shape)
    assert diff == pytest.approx(2 * 20 * math.log(2 * math.pi), rel=1e-14)
    # β = 0: independent uniform plaquettes, χ_t = <φ²>/4π² = 1/12 in the infinite volume
    assert exact.u1_topological_susceptibility_infinite(0.0) == pytest.approx(1 / 12, rel=1e-12)


@pytest.mark.parametrize("beta", [0.5, 2.0, 5.0])
def test_u1_large_volume_limits(beta):
    ratio = special.ive(1, beta) / special.ive(0, beta)
    diffs = [abs(exact.u1_mean_plaquette(beta, (n, n)) - ratio) for n in (3, 4, 6)]
    assert diffs[0] > diffs[1] > diffs[2]
    assert exact.u1_mean_plaquette(beta, (64, 64)) == pytest.approx(ratio, rel=1e-12)
    chi_inf = exact.u1_topological_susceptibility_infinite(beta)
    assert exact.u1_topological_susceptibility(beta, (48, 48)) == pytest.approx(chi_inf, rel=1e-9)
    w_inf = exact.u1_wilson_loop_infinite(beta, 2, 3)
    assert exact.u1_wilson_loop(beta, (64, 64), 2, 3) == pytest.approx(w_inf, rel=1e-10)


@pytest.mark.parametrize("beta", [0.7, 3.0])
def test_u1_wilson_loop_identities(beta):
    shape = (4, 3)
    assert exact.u1_wilson_loop(beta, shape, 1, 1) == pytest.approx(
        exact.u1_mean_plaquette(beta, shape), rel=1e-13
    )
    # a loop and its complement on the torus (areas A and V − A) have the same expectation
    assert exact.u1_wilson_loop(beta, shape, 4, 1) == pytest.approx(
        exact.u1_wilson_loop(beta, shape, 4, 2), rel=1e-12
    )
    assert exact.u1_wilson_loop(beta, shape, 1, 3) == pytest.approx(
        exact.u1_wilson_loop(beta, shape, 3, 3), rel=1e-12
    )
    assert exact.u1_wilson_loop(beta, shape, 4, 3) == pytest.approx(1.0, rel=1e-13)
    assert exact.u1_wilson_loop(beta, (3, 1), 2, 1) == pytest.approx(
        exact.u1_mean_plaquette(beta, (3, 1)), rel=1e-13
    )
    assert exact.u1_wilson_loop(beta, shape, 2, 2) < exact.u1_wilson_loop(beta, shape, 2, 1)
