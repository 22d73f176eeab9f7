"""The exact 2D U(1) sampler against the exact torus results, and the exact charge distribution.

The samples are independent, so the standard error of a sample mean is std/√N. Each comparison
allows 4 standard errors: a correct sampler fails one with probability 6e-5 (Gaussian tails; the
seeds are fixed, so a pass is reproducible), while a sampler that is off by a few per cent in
⟨Q²⟩, or by 1e-3 in ⟨cos P⟩, fails at N = 40000.
"""

import importlib
import math

import numpy as np
import pytest
import torch

from latticeflow import exact
from latticeflow.lattice import plaquette
from latticeflow.observables import topological_charge
from latticeflow.samplers.exact_u1 import expected_acceptance, sample_exact_u1

N_SAMPLES = 40000
exact_u1_module = importlib.import_module("latticeflow.samplers.exact_u1")


@pytest.mark.parametrize("lattice", [(4, 4), (6, 6)])
@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_exact_sampler_reproduces_the_exact_torus_results(lattice, beta):
    links = sample_exact_u1(beta, lattice, N_SAMPLES, generator=torch.Generator().manual_seed(7))
    # ⟨cos P⟩: the per-configuration site average is the independent unit.
    cos_p = torch.cos(plaquette(links)).mean((1, 2))
    error = cos_p.std().item() / math.sqrt(N_SAMPLES)
    assert abs(cos_p.mean().item() - exact.u1_mean_plaquette(beta, lattice)) < 4 * error
    q = topological_charge(links).round().long()
    q2 = (q**2).double()
    error = q2.std().item() / math.sqrt(N_SAMPLES)
    assert abs(q2.mean().item() - exact.u1_mean_q2(beta, lattice)) < 4 * error
    # Q histogram: each frequency is binomial, standard error √(p(1 − p)/N); a charge with
    # N·p < 1e-3 must not appear at all (it would, with probability below 1e-3).
    charges, p = exact.u1_charge_distribution(beta, lattice)
    counts = np.array([(q == c).sum().item() for c in charges])
    assert counts.sum() == N_SAMPLES
    frequency = counts / N_SAMPLES
    error = np.sqrt(p * (1 - p) / N_SAMPLES)
    visible = N_SAMPLES * p >= 1e-3
    assert np.all(np.abs(frequency - p)[visible] < 4 * error[visible] + 1e-12)
    assert np.all(counts[~visible] == 0)


def test_acceptance_rate_matches_the_exact_formula(monkeypatch):
    """Proposals per accepted row are geometric: n accepted rows take n/a ± √(n(1 − a))/a."""
    beta, lattice, n = 3.0, (4, 4), 20000
    proposals, von_mises = [], exact_u1_module.von_mises

    def counting_von_mises(concentration, shape, **kwargs):
        proposals.append(shape[0])
        return von_mises(concentration, shape, **kwargs)

    monkeypatch.setattr(exact_u1_module, "von_mises", counting_von_mises)
    sample_exact_u1(beta, lattice, n, generator=torch.Generator().manual_seed(8))
    a = expected_acceptance(beta, lattice)
    assert abs(sum(proposals) - n / a) < 4 * math.sqrt(n * (1 - a)) / a


@pytest.mark.parametrize(("beta", "lattice"), [(0.0, (4, 4)), (2.0, (3, 5)), (6.0, (4, 6))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_links_are_in_range_and_plaquettes_satisfy_the_torus_constraint(beta, lattice, dtype):
    links = sample_exact_u1(beta, lattice, 500, generator=torch.Generator().manual_seed(9),
                            dtype=dtype)
    assert links.shape == (500, 2, *lattice) and links.dtype == dtype
    assert links.min() >= 0 and links.max() < 2 * math.pi
    # Σ_x wrap(P(x)) ≡ 0 (mod 2π): Q is an integer up to the dtype's round-off.
    q = topological_charge(links.double())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-3
    assert (q - q.round()).abs().max() < tolerance
    again = sample_exact_u1(beta, lattice, 500, generator=torch.Generator().manual_seed(9),
                            dtype=dtype)
    assert torch.equal(links, again)


@pytest.mark.parametrize("lattice", [(3, 3), (4, 4), (3, 5), (6, 6)])
@pytest.mark.parametrize("beta", [0.0, 1.0, 3.0])
def test_charge_distribution_agrees_with_the_theta_derivative(lattice, beta):
    """Two routes to ⟨Q²⟩: the DFT of Z(θ) and −Z''(0)/Z(0) by quadrature."""
    charges, p = exact.u1_charge_distribution(beta, lattice)
    assert abs(p.sum() - 1) < 1e-12
    assert np.allclose(p, p[::-1], atol=1e-14)
    assert abs((charges**2 * p).sum() - exact.u1_mean_q2(beta, lattice)) < 1e-10
