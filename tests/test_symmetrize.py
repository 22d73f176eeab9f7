"""The symmetry-averaged flow q_G(y) = (1/|G|) Σ_g q(g⁻¹ y): exact identities and sampling."""

from __future__ import annotations

import math

import pytest
import torch
from flow_helpers import random_flow

from latticeflow.flows import build_flow
from latticeflow.flows.symmetrize import LatticeSymmetry, SymmetrizedFlow, diagonal_shifts

_LOG_2PI = math.log(2 * math.pi)


def test_symmetry_and_its_inverse_compose_to_the_identity():
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    g = LatticeSymmetry((1, 3), negate=True)
    assert torch.equal(g.inverse(g(x)), x)
    assert torch.equal(g(x)[:, 1, 3], -x[:, 0, 0])  # g x (s) = −x(s − shift)


@pytest.mark.parametrize("variant", ["phi4-spline", "phi4-multiscale", "phi4-heatbath"])
def test_mixture_over_a_group_is_invariant_under_it(variant):
    flow = random_flow(variant)
    group = diagonal_shifts(2, 4, z2=True)  # (k, k) mod 4 on 4×4, with φ → −φ: a group
    mixed = SymmetrizedFlow(flow, group)
    y = torch.randn(5, 4, 4, dtype=torch.float64)
    plain = flow.log_prob(y)
    reference = mixed.log_prob(y)
    for g in group:
        assert torch.allclose(mixed.log_prob(g(y)), reference, atol=1e-12)
    # the flow itself is not invariant, so the test could tell the two apart
    assert max((flow.log_prob(g(y)) - plain).abs().max() for g in group) > 1e-3


def test_mixture_of_an_invariant_flow_is_the_flow():
    flow = build_flow("phi4", (6, 6), {"base": "fourier", "n_couplings": 0}).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.3)
    mixed = SymmetrizedFlow(flow, diagonal_shifts(2, 6, z2=True))
    y = torch.randn(4, 6, 6, dtype=torch.float64)
    assert torch.allclose(mixed.log_prob(y), flow.log_prob(y), atol=1e-12)


def test_sample_reports_the_mixture_density_of_its_draws():
    flow = random_flow("phi4-multiscale")
    mixed = SymmetrizedFlow(flow, diagonal_shifts(2, 3, z2=True))  # not a group mod 4: fine
    y, log_q = mixed.sample(64, torch.Generator().manual_seed(1))
    assert torch.allclose(log_q, mixed.log_prob(y), atol=1e-10)


def test_heat_bath_sample_adds_the_even_sites_conditional():
    flow = random_flow("phi4-heatbath")
    mixed = SymmetrizedFlow(flow, diagonal_shifts(2, 4))
    y, log_q = mixed.sample(32, torch.Generator().manual_seed(2))
    marginal = flow.heat_bath
    cond, even, h = marginal._parts(y)
    # the layers carry the placeholders as standard normal noise: with them set to 0 the
    # mixture's density is the odd part plus n_even · log N(0)
    aux = y.clone()
    aux[:, even] = 0.0
    odd_part = mixed.log_prob(aux) + 0.5 * _LOG_2PI * int(even.sum())
    expected = odd_part + cond.log_prob(y[:, even], h).sum(1)
    assert torch.allclose(log_q, expected, atol=1e-10)


def test_draws_follow_the_mixture():
    """E_{q_G}[q(y)/q_G(y)] = ∫ q = 1: the draws and the reported density belong together."""
    flow = random_flow("phi4-multiscale", std=0.3)
    mixed = SymmetrizedFlow(flow, diagonal_shifts(2, 4, z2=True))
    with torch.no_grad():
        y, log_q_mix = mixed.sample(20000, torch.Generator().manual_seed(3))
        ratio = torch.exp(flow.log_prob(y) - log_q_mix)
    standard_error = ratio.std() / math.sqrt(len(ratio))
    assert abs(ratio.mean().item() - 1) < 4 * standard_error.item()
    assert ratio.std() > 0.05  # q and q_G differ, so the check has power


def test_bad_symmetries_are_refused():
    flow = random_flow("phi4-heatbath")
    with pytest.raises(ValueError, match="even sum"):
        SymmetrizedFlow(flow, [LatticeSymmetry((0, 0)), LatticeSymmetry((1, 0))])
    with pytest.raises(ValueError, match="at least one"):
        SymmetrizedFlow(flow, [])
    with pytest.raises(ValueError, match="does not match"):
        SymmetrizedFlow(flow, [LatticeSymmetry((0, 0, 0))])
    with pytest.raises(ValueError, match="at least one shift"):
        diagonal_shifts(2, 0)
