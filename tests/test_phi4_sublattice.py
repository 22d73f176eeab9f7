"""The even-sublattice marginal of φ⁴ and its one-site conditional p(y | h) ∝ exp(−ay² − by⁴ + chy).

References are independent of the module: scipy's adaptive ``quad`` for the one-site integrals,
a 2-D trapezoid grid over the full action for the 2×2 marginal, ``torch.roll`` neighbour sums.
Samplers are checked at ~5 standard errors (seeded, so the outcome is fixed; a correct sampler
would fail one such check with probability ~6e-7).
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from latticeflow.theories import Phi4, Phi4Hopping, U1Wilson
from latticeflow.theories.phi4_sublattice import Phi4EvenMarginal, SiteConditional

# (a, b, c): the 2-D critical line of the standard form (m² = −4, a = 2d + m² = 0) at two λ,
# a hopping-form card (κ = 0.3, λ̂ = 0.02) and a double well (a < 0).
PARAMS = [(0.0, 4.4, 2.0), (0.0, 8.0, 2.0), (0.96, 0.02, 0.6), (-2.0, 1.0, 2.0)]
LOG_2PI = math.log(2 * math.pi)


def _reference(a, b, c, h):
    """(log Z, ⟨y⟩, ⟨y²⟩, ⟨y⁴⟩) at h by adaptive quadrature (errors ≲ 1e-11; the integrand is
    scaled to peak 1 and Z ≳ 0.1 here, so epsabs 1e-12 is ≲ 1e-11 relative)."""
    def g(y):
        return -a * y * y - b * y**4 + c * h * y

    grid = np.linspace(-30, 30, 60001)
    top = g(grid).max()
    inside = grid[g(grid) > top - 70]  # the integrand is < e^-70 of its peak outside
    lo, hi = inside[0] - 0.01, inside[-1] + 0.01
    stationary = np.roots([-4 * b, 0, -2 * a, c * h]) if b > 0 else [c * h / (2 * a)]
    points = sorted({float(r.real) for r in np.atleast_1d(stationary)
                     if abs(r.imag) < 1e-9 and lo < r.real < hi})
    moments = [integrate.quad(lambda y, k=k: y**k * math.exp(g(y) - top), lo, hi, points=points,
                              limit=200, epsabs=1e-12, epsrel=1e-13)[0] for k in (0, 1, 2, 4)]
    return top + math.log(moments[0]), *(m / moments[0] for m in moments[1:])


def _cdf(a, b, c, h):
    """The CDF of p(· | h) by cumulative Simpson quadrature on a fine grid, as a callable."""
    y = np.linspace(-25, 25, 400001)
    g = -a * y * y - b * y**4 + c * h * y
    cumulative = integrate.cumulative_simpson(np.exp(g - g.max()), x=y, initial=0)
    return lambda t: np.interp(t, y, cumulative / cumulative[-1])


@pytest.mark.parametrize("abc", PARAMS)
def test_log_normalizer_and_mean_match_quadrature(abc):
    cond = SiteConditional(*abc)
    hs = np.linspace(-20, 20, 41) + 0.37  # off the table nodes
    ref = np.array([_reference(*abc, h)[:2] for h in hs])
    h = torch.tensor(hs)
    # goal 1e-9; the table is built for ~1e-11 and the references are good to ~1e-12
    np.testing.assert_allclose(cond.log_normalizer(h).numpy(), ref[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(cond.mean(h).numpy(), ref[:, 1], rtol=0, atol=1e-9)


def test_symmetry_gradient_and_float32():
    a, b, c = PARAMS[0]
    cond = SiteConditional(a, b, c)
    h = torch.cat([torch.zeros(1), torch.linspace(-9, 9, 301)]).requires_grad_()
    log_z = cond.log_normalizer(h)
    # log Z is even and ⟨y⟩ odd in h, exactly (the table is built on |c h|)
    assert torch.equal(cond.log_normalizer(-h), log_z)
    assert torch.equal(cond.mean(-h), -cond.mean(h))
    # d log Z/dh = c ⟨y⟩ for the same interpolant: equal up to rounding
    (grad,) = torch.autograd.grad(log_z.sum(), h)
    torch.testing.assert_close(grad, c * cond.mean(h), rtol=1e-12, atol=1e-12)
    # log_prob: normalised (trapezoid, spectrally accurate) and differentiable in y and h
    y = torch.linspace(-4, 4, 8001)[:, None].requires_grad_()
    lp = cond.log_prob(y, h.detach()[::60])
    total = torch.exp(lp).sum(0) * (y[1] - y[0])
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-12, atol=0)
    (dy,) = torch.autograd.grad(lp.sum(), y)
    expect = (-2 * a * y - 4 * b * y**3 + c * h.detach()[::60]).sum(1, keepdim=True)
    torch.testing.assert_close(dy, expect, rtol=1e-12, atol=1e-10)
    # float32 in, float32 out, within float32 rounding of values up to ~25
    h32 = h.detach().float()
    out32, mean32 = cond.log_normalizer(h32), cond.mean(h32)
    assert out32.dtype == mean32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), log_z.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(mean32.double(), cond.mean(h.detach()), rtol=0, atol=2e-5)


def test_table_grows_beyond_its_range():
    cond = SiteConditional(*PARAMS[0])
    small = torch.linspace(-3, 3, 13)
    before = cond.log_normalizer(small)
    covered = cond.h_range
    assert 3 <= covered < 150
    far = torch.tensor([-150.3, 97.1])
    values, means = cond.log_normalizer(far), cond.mean(far)
    assert cond.h_range >= 150.3
    ref = np.array([_reference(*PARAMS[0], h)[:2] for h in far.tolist()])
    # log Z ≈ 600 here: 1e-9 is still ~1e3 ulp; ⟨y⟩ as in the main accuracy test
    np.testing.assert_allclose(values.numpy(), ref[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(means.numpy(), ref[:, 1], rtol=0, atol=1e-9)
    # the rebuilt table agrees with the old one to its interpolation error (~1e-11)
    torch.testing.assert_close(cond.log_normalizer(small), before, rtol=0, atol=1e-10)
    assert torch.isnan(cond.log_normalizer(torch.tensor([math.nan, 1.0])))[0]


@pytest.mark.parametrize("abc", [*PARAMS, (1.5, 0.0, 2.0)])
def test_sample_moments(abc):
    hs = [0.0, -1.3, 4.0]
    n = 200_000
    y = SiteConditional(*abc).sample(torch.tensor(hs)[:, None].expand(-1, n),
                                      torch.Generator().manual_seed(7))
    for row, h in zip(y, hs, strict=True):
        _, m1, m2, m4 = _reference(*abc, h)
        se1, se2 = math.sqrt((m2 - m1 * m1) / n), math.sqrt((m4 - m2 * m2) / n)
        assert abs(row.mean().item() - m1) < 5 * se1, (h, row.mean().item(), m1)
        assert abs((row * row).mean().item() - m2) < 5 * se2, (h, (row * row).mean().item(), m2)


@pytest.mark.parametrize(("abc", "h"), [(PARAMS[0], 0.8), (PARAMS[2], -6.0), (PARAMS[3], 0.4)])
def test_sample_kolmogorov_smirnov(abc, h):
    y = SiteConditional(*abc).sample(torch.full((200_000,), h), torch.Generator().manual_seed(3))
    assert stats.kstest(y.numpy(), _cdf(*abc, h)).pvalue > 1e-3


def test_sample_reproducible_shape_dtype():
    cond = SiteConditional(*PARAMS[3])
    h = torch.randn(3, 5, dtype=torch.float32) * 3
    first = cond.sample(h, torch.Generator().manual_seed(11))
    assert first.shape == h.shape and first.dtype == torch.float32
    assert torch.equal(first, cond.sample(h, torch.Generator().manual_seed(11)))
    assert not torch.equal(first, cond.sample(h, torch.Generator().manual_seed(12)))
    with pytest.raises(ValueError):
        cond.sample(torch.tensor([1.0, math.inf]))


@pytest.mark.parametrize("abc", [(1.0, -0.1, 1.0), (0.0, 0.0, 1.0), (-1.0, 0.0, 2.0),
                                 (math.nan, 1.0, 2.0), (1.0, math.inf, 2.0)])
def test_bad_parameters(abc):
    with pytest.raises(ValueError):
        SiteConditional(*abc)


def test_marginal_rejects_bad_input():
    with pytest.raises(TypeError):
        Phi4EvenMarginal(U1Wilson(1.0))
    marginal = Phi4EvenMarginal(Phi4(-4.0, 8.0))
    with pytest.raises(ValueError):
        marginal(torch.randn(2, 4, 5))  # odd extent: not bipartite
    with pytest.raises(ValueError):
        Phi4EvenMarginal(Phi4(-5.0, 0.0))(torch.randn(2, 4, 4))  # a = 2d + m² < 0 at λ = 0


ACTIONS = [
    (Phi4(-4.0, 4.4), (3, 4, 6)),
    (Phi4(-4.0, 8.0), (2, 2, 2)),
    (Phi4(0.7, 0.3), (2, 4, 4, 6)),
    (Phi4Hopping(0.3, 0.02), (3, 6, 4)),
    (Phi4Hopping(0.3, 0.8), (2, 4, 4, 2)),  # a = 1 − 2λ̂ < 0: double well
]


@pytest.mark.parametrize(("action", "shape"), ACTIONS)
def test_force_is_minus_gradient(action, shape):
    marginal = Phi4EvenMarginal(action)
    x = (2 * torch.randn(shape)).requires_grad_()
    (grad,) = torch.autograd.grad(marginal(x).sum(), x)
    # the closed-form ⟨y⟩ is the derivative of the same interpolant: equal to rounding
    torch.testing.assert_close(marginal.force(x), -grad, rtol=1e-11, atol=1e-11)
    assert marginal.params() == action.params() and marginal.card() == action.card()
    assert marginal.field_shape(shape[1:]) == shape[1:] and "Phi4EvenMarginal" in repr(marginal)


def _even_mask(lattice):
    return (sum(torch.meshgrid(*[torch.arange(n) for n in lattice], indexing="ij")) % 2) == 0


@pytest.mark.parametrize(("action", "half_width"), [(Phi4(-3.0, 2.0), 4.0),
                                                   (Phi4Hopping(0.4, 0.1), 7.0)])
def test_marginal_on_2x2_is_the_integral_over_the_even_sites(action, half_width):
    # even sites (0,0), (1,1); odd sites (0,1) = 0.3, (1,0) = −0.7; auxiliaries 0.4, −1.1
    x = torch.tensor([[[0.4, 0.3], [-0.7, -1.1]]])
    y = torch.linspace(-half_width, half_width, 701)  # integrand < e^-100 at the ends
    y0, y1 = torch.meshgrid(y, y, indexing="ij")
    full = x.expand(y.numel() ** 2, 2, 2).clone()
    full[:, 0, 0], full[:, 1, 1] = y0.reshape(-1), y1.reshape(-1)
    # 2-D trapezoid (spectrally accurate) over the full action, on the 2-wide torus
    log_integral = torch.logsumexp(-action(full), 0) + 2 * torch.log(y[1] - y[0])
    log_aux = -0.5 * (0.4**2 + 1.1**2) - LOG_2PI
    # relative 1e-8 on exp(−S_marg); the quadrature itself is good to ~1e-14
    assert abs(-Phi4EvenMarginal(action)(x).item() - (log_integral.item() + log_aux)) < 1e-8


@pytest.mark.parametrize(("action", "shape"), [(Phi4(-4.0, 4.4), (3, 4, 4)),
                                               (Phi4(-1.0, 1.3), (3, 6, 6)),
                                               (Phi4(-5.5, 1.0), (2, 4, 4, 4)),
                                               (Phi4Hopping(0.3, 0.02), (3, 4, 4)),
                                               (Phi4Hopping(0.27, 0.9), (3, 6, 6))])
def test_full_action_factorises(action, shape):
    marginal = Phi4EvenMarginal(action)
    lattice = shape[1:]
    cond = marginal.conditional(len(lattice))
    x = 1.5 * torch.randn(shape)
    even = _even_mask(lattice)
    h = sum(torch.roll(x, k, dims=ax) for ax in range(1, x.dim()) for k in (1, -1))[:, even]
    log_n = lambda z: (-0.5 * z * z - 0.5 * LOG_2PI).sum(1)  # noqa: E731
    log_cond = cond.log_prob(x[:, even], h).sum(1)
    # −S(x) = −S_marg(x) − Σ log N(x_e) + Σ log p(x_e | h_e), with x's own evens as auxiliaries
    # (exp(−S_marg) carries the factor Π N(aux)); float64 rounding of terms ~1e2: rtol 1e-12
    torch.testing.assert_close(-marginal(x) - log_n(x[:, even]) + log_cond, -action(x),
                               rtol=1e-12, atol=1e-10)
    # ... and exp(−S_marg)/N(aux) does not depend on the auxiliaries
    other = torch.where(even, torch.randn(shape), x)
    torch.testing.assert_close(-marginal(other) - log_n(other[:, even]),
                               -marginal(x) - log_n(x[:, even]), rtol=1e-12, atol=1e-10)


def test_complete():
    action = Phi4(-4.0, 4.4)
    marginal = Phi4EvenMarginal(action)
    lattice = (4, 4)
    even = _even_mask(lattice)
    n = 20_000
    x = torch.randn(1, *lattice).expand(n, -1, -1).clone()  # one odd field, many auxiliaries
    x[:, even] = torch.randn(n, int(even.sum()))
    before = x.clone()
    full, delta = marginal.complete(x, torch.Generator().manual_seed(5))
    assert torch.equal(x, before)
    assert torch.equal(full[:, ~even], x[:, ~even]) and not torch.equal(full[:, even], x[:, even])
    cond = marginal.conditional(2)
    h = sum(torch.roll(x, k, dims=ax) for ax in (1, 2) for k in (1, -1))[:, even]
    expect = (cond.log_prob(full[:, even], h) + 0.5 * x[:, even] ** 2 + 0.5 * LOG_2PI).sum(1)
    torch.testing.assert_close(delta, expect, rtol=1e-13, atol=1e-12)
    # the completed evens follow p(· | h): per site, mean within 5 standard errors of ⟨y⟩_h
    news = full[:, even]
    se = news.std(0) / math.sqrt(n)
    assert ((news.mean(0) - cond.mean(h[0])).abs() < 5 * se).all()
    again = marginal.complete(x, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], full) and torch.equal(again[1], delta)
    # log q_full = log q + delta: for q the exact marginal (∝ exp(−S_marg)) this is exp(−S)
    torch.testing.assert_close(-action(full), -marginal(x) + delta, rtol=1e-12, atol=1e-10)
