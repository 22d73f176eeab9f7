"""Edge cases of the U(1) code: β = 0 with the plaquette prior, the von Mises sampler at tiny
concentration, and link angles kept in the half-open [0, 2π) in float32 and float64."""

import importlib
import math

import numpy as np
import pytest
import scipy.stats
import torch

import latticeflow.flows.plaquette_prior as plaquette_prior_module
from latticeflow.flows import build_flow
from latticeflow.flows.ncp import NCPParams, ncp_inverse
from latticeflow.flows.plaquette_prior import PlaquettePrior, von_mises
from latticeflow.flows.priors import UniformAnglePrior
from latticeflow.lattice import mod_2pi

TWO_PI = 2 * math.pi
# The package re-exports the function u1_equivariant under the module's name.
u1_module = importlib.import_module("latticeflow.flows.u1_equivariant")


def test_beta_zero_with_the_default_plaquette_prior_is_the_uniform_prior():
    flow = build_flow("u1", (4, 4), {"n_couplings": 2}, {"beta": 0.0})
    assert isinstance(flow.prior, UniformAnglePrior)
    links = 2 * math.pi * torch.rand(3, 2, 4, 4)
    # The κ → 0 limit of the plaquette prior's density is the uniform one, (2π)^(−2V).
    uniform = torch.full((3,), -32 * math.log(TWO_PI))
    assert torch.allclose(flow.prior.log_prob(links), uniform)
    assert torch.allclose(PlaquettePrior((4, 4), 1e-12).log_prob(links), uniform)
    x, log_q = flow.sample(5)
    assert x.shape == (5, 2, 4, 4) and torch.isfinite(log_q).all()


@pytest.mark.parametrize("kappa", [0.0, 1e-300, 1e-17, 1e-12, 1e-9])
def test_von_mises_at_tiny_concentration_is_finite_and_uniform(kappa):
    g = torch.Generator().manual_seed(5)
    x = von_mises(kappa, (20000,), generator=g, dtype=torch.float64).numpy()
    assert np.all(np.isfinite(x)) and np.all(np.abs(x) <= math.pi)
    # e^{κ cos P}/I₀(κ) differs from 1 by at most κ ≤ 1e-9: indistinguishable from uniform.
    assert scipy.stats.kstest(x, scipy.stats.uniform(-math.pi, TWO_PI).cdf).pvalue > 1e-3


@pytest.mark.parametrize(("dtype", "tiny"), [(torch.float32, -1e-9), (torch.float64, -1e-17)])
def test_mod_2pi_is_half_open(dtype, tiny):
    """``remainder`` rounds ``tiny`` (just below 0) to exactly 2π in ``dtype``; mod_2pi gives 0."""
    assert torch.remainder(torch.tensor(tiny, dtype=dtype), TWO_PI) == TWO_PI
    x = torch.tensor([tiny, -1e-30, -TWO_PI + tiny, 0.0, TWO_PI, 7.0, -7.0], dtype=dtype)
    y = mod_2pi(x)
    assert y.dtype == dtype
    assert bool(((y >= 0) & (y < TWO_PI)).all())
    assert torch.allclose(torch.cos(y), torch.cos(x), atol=1e-6)
    assert y[0] == 0 and y[1] == 0


def test_plaquette_prior_samples_stay_below_2pi_in_float32(monkeypatch):
    """Links that come out of the gauge transform just below 0 must not wrap to 2π."""
    monkeypatch.setattr(plaquette_prior_module, "gauge_transform",
                        lambda links, alpha: torch.full_like(links, -1e-9))
    links = PlaquettePrior((4, 4), 1.0).sample(2, dtype=torch.float32)
    assert links.dtype == torch.float32 and links.max() < TWO_PI


def test_plaquette_coupling_keeps_links_below_2pi_in_float32(monkeypatch):
    """A link update x + h(u) − u that lands just below 0 (here h(u) = u − 1e-9 on the cold
    configuration) must give 0, not 2π, forwards and backwards."""
    coupling = u1_module.PlaquetteCoupling((4, 4), 0, 0, 2, [4], 3, "leaky_relu").float()
    monkeypatch.setattr(u1_module, "ncp", lambda u, p, need_second=True: (
        u - 1e-9, torch.ones_like(u), torch.zeros_like(u)))
    monkeypatch.setattr(u1_module, "ncp_inverse", lambda v, p: (v, v + 1e-9, torch.ones_like(v)))
    cold = torch.zeros(2, 2, 4, 4, dtype=torch.float32)
    y = coupling.transform(cold, coupling.condition(cold)).y
    x, _ = coupling.untransform(cold, coupling.condition(cold))
    assert y.max() < TWO_PI and x.max() < TWO_PI


def test_ncp_inverse_target_is_half_open_in_float32():
    """v just below the shift t: v* ≡ v must lie in [t, t + 2π), not at t + 2π."""
    shift = torch.ones(1, dtype=torch.float32)
    v = torch.nextafter(shift, torch.zeros(1, dtype=torch.float32))
    params = NCPParams(torch.zeros(1, 2, dtype=torch.float32),
                       torch.full((1, 2), 0.5, dtype=torch.float32), shift)
    u, target, _ = ncp_inverse(v, params)
    assert shift <= target < shift + TWO_PI
    assert 0 <= u < TWO_PI
