"""The independent-plaquette U(1) prior: sampler, density and score against exact results."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from latticeflow import exact
from latticeflow.flows.plaquette_prior import PlaquettePrior, comb_gauge_links, von_mises
from latticeflow.lattice import gauge_transform, plaquette, wrap
from latticeflow.observables import topological_charge
from latticeflow.theories.u1 import U1Wilson


@pytest.mark.parametrize("kappa", [0.3, 2.0, 6.0])
def test_von_mises_sampler_matches_the_distribution(kappa):
    g = torch.Generator().manual_seed(3)
    x = von_mises(kappa, (50000,), generator=g, dtype=torch.float64).numpy()
    assert np.all(np.abs(x) <= math.pi)
    # A wrong sampler (e.g. a wrong wrapped-Cauchy parameter) fails this at 50000 draws.
    assert scipy.stats.kstest(x, scipy.stats.vonmises(kappa).cdf).pvalue > 1e-3


def test_comb_gauge_links_have_the_requested_plaquettes_and_holonomies():
    g = torch.Generator().manual_seed(0)
    plaq = 2 * math.pi * torch.rand(5, 4, 8, generator=g) - math.pi
    plaq[:, -1, -1] = -plaq.flatten(1)[:, :-1].sum(1)
    holonomy = 2 * math.pi * torch.rand(5, 2, generator=g)
    links = comb_gauge_links(plaq, holonomy)
    assert wrap(plaquette(links) - plaq).abs().max() < 1e-12
    assert wrap(links[:, 0, :, 0].sum(1) - holonomy[:, 0]).abs().max() < 1e-12
    assert wrap(links[:, 1, 0, :].sum(1) - holonomy[:, 1]).abs().max() < 1e-12


def test_density_is_normalised():
    """E_uniform[q₀/u] = 1, with u = (2π)^(−2V) the uniform link density (4×4, κ = 1)."""
    prior = PlaquettePrior((4, 4), 1.0)
    g = torch.Generator().manual_seed(1)
    links = 2 * math.pi * torch.rand(200000, 2, 4, 4, generator=g)
    ratio = torch.exp(prior.log_prob(links) + 32 * math.log(2 * math.pi))
    error = ratio.std().item() / math.sqrt(len(ratio))
    assert abs(ratio.mean().item() - 1) < 4 * error


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_samples_follow_the_density(beta):
    """Importance sampling the Wilson action from the prior reproduces the exact log Z (Lebesgue
    measure) and ⟨Q²⟩: the sampler and log_prob describe the same distribution."""
    lattice = (4, 4)
    prior = PlaquettePrior(lattice, beta)
    g = torch.Generator().manual_seed(2)
    links = prior.sample(40000, generator=g)
    assert links.min() >= 0 and links.max() < 2 * math.pi
    log_w = -U1Wilson(beta)(links) - prior.log_prob(links)
    w = torch.exp(log_w - log_w.max())
    log_z = (torch.log(w.mean()) + log_w.max()).item()
    rel_error = (w.std() / w.mean()).item() / math.sqrt(len(w))
    assert abs(log_z - exact.u1_log_z(beta, lattice, measure="lebesgue")) < 4 * rel_error
    q2 = topological_charge(links).double() ** 2
    estimate = (w * q2).sum() / w.sum()
    # delta-method error of the self-normalised estimate
    error = torch.sqrt((w**2 * (q2 - estimate) ** 2).sum()) / w.sum()
    assert abs(estimate.item() - exact.u1_mean_q2(beta, lattice)) < 4 * error.item()


def test_score_is_the_gradient_and_density_is_gauge_and_translation_invariant():
    prior = PlaquettePrior((4, 8), 2.5)
    g = torch.Generator().manual_seed(4)
    links = 2 * math.pi * torch.rand(3, 2, 4, 8, generator=g)
    x = links.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prior.log_prob(x).sum(), x)
    assert torch.allclose(prior.score(links), grad, atol=1e-12)
    alpha = 2 * math.pi * torch.rand(3, 4, 8, generator=g)
    log_q = prior.log_prob(links)
    assert torch.allclose(prior.log_prob(gauge_transform(links, alpha)), log_q, atol=1e-10)
    assert torch.allclose(prior.log_prob(torch.roll(links, (1, 3), dims=(2, 3))), log_q,
                          atol=1e-10)


def test_weak_concentration_approaches_the_uniform_density():
    prior = PlaquettePrior((4, 4), 1e-9)
    links = 2 * math.pi * torch.rand(4, 2, 4, 4)
    expected = torch.full((4,), -32 * math.log(2 * math.pi))
    assert torch.allclose(prior.log_prob(links), expected, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2D"):
        PlaquettePrior((4, 4, 4), 1.0)
    with pytest.raises(ValueError, match="concentration"):
        PlaquettePrior((4, 4), 0.0)
