"""Circular rational-quadratic splines (flows/spline.py) and the U(1) spline coupling.

The flow-level exactness tests run on the "u1-spline" variant in test_flows.py (round trip,
log-det against the brute-force Jacobian, score recursion both ways, gauge and translation
equivariance) and test_estimators.py (fast path equal to the drop-in path, the six estimators
against finite differences, unbiasedness, zero path gradients at the optimum). Here: the circle
map itself, float32 near the seam 0 ≡ 2π, the fresh coupling, and the constructor's checks.
"""

import math
from pathlib import Path

import pytest
import torch
from flow_helpers import random_flow, wrap_difference

from latticeflow.base.errors import LatticeflowError
from latticeflow.config import recipe_from_dict
from latticeflow.flows import DEFAULT_ARCHITECTURE, build_flow
from latticeflow.flows.spline import (
    Knots,
    circular_knots,
    circular_spline,
    circular_spline_inverse,
)
from latticeflow.flows.u1_equivariant import PlaquetteSplineCoupling, u1_equivariant
from latticeflow.lattice import mod_2pi
from latticeflow.training.checkpoint import check_init_from, refuse_other_recipe

TWO_PI = 2 * math.pi


def _params(shape, k=5, seed=0, dtype=torch.float64, scale=1.0):
    """Random knots and rotations for splines of ``shape`` = (batch, ...)."""
    g = torch.Generator().manual_seed(seed)
    raw = [scale * torch.randn(shape[0], k, *shape[1:], generator=g, dtype=dtype)
           for _ in range(3)]
    return circular_knots(*raw), TWO_PI * torch.rand(shape, generator=g, dtype=dtype)


def test_knots_span_the_circle_with_equal_end_slopes():
    knots, _ = _params((4, 3))
    assert torch.equal(knots.x[:, 0], torch.zeros_like(knots.x[:, 0]))
    assert torch.equal(knots.y[:, -1], torch.full_like(knots.y[:, -1], TWO_PI))
    assert (knots.x.diff(dim=1) > 0).all() and (knots.y.diff(dim=1) > 0).all()
    assert torch.equal(knots.slope[:, 0], knots.slope[:, -1]) and (knots.slope > 0).all()


def test_derivatives_match_autograd():
    knots, shift = _params((6, 4))
    u = (TWO_PI * torch.rand(6, 4, dtype=torch.float64)).requires_grad_(True)
    h, log_deriv, dlog = circular_spline(u, knots, shift, need_dlog=True)
    assert ((h >= 0) & (h < TWO_PI)).all()
    (dh,) = torch.autograd.grad(h.sum(), u, create_graph=True)
    torch.testing.assert_close(log_deriv, torch.log(dh), rtol=0, atol=1e-12)
    (dlog_auto,) = torch.autograd.grad(torch.log(dh).sum(), u)
    torch.testing.assert_close(dlog, dlog_auto, rtol=1e-9, atol=1e-9)


def test_round_trip_for_any_angle():
    knots, shift = _params((6, 4))
    u = 6 * math.pi * torch.rand(6, 4, dtype=torch.float64) - 3 * math.pi  # not wrapped
    h, log_deriv, _ = circular_spline(u, knots, shift)
    back, log_deriv_back = circular_spline_inverse(h + TWO_PI * 3, knots, shift)
    assert ((back >= 0) & (back < TWO_PI)).all()
    assert wrap_difference(back, u).abs().max() < 1e-12
    torch.testing.assert_close(log_deriv_back, log_deriv, rtol=0, atol=1e-12)


def test_a_degree_one_circle_map_with_continuous_derivative():
    """On a fine grid around the circle, h increases by exactly 2π in total, never decreases,
    and log h' changes between neighbours by no more than the grid step times max |(log h')'|
    (a jump of log h' would not), across 0 ≡ 2π included."""
    n = 20001
    knots, shift = _params((1, 3))
    on_grid = Knots(*(t.unsqueeze(2).expand(-1, -1, n, -1)
                      for t in (knots.x, knots.y, knots.slope)))
    u = torch.linspace(0, TWO_PI, n, dtype=torch.float64).view(1, -1, 1).expand(1, -1, 3)
    h, log_deriv, dlog = circular_spline(u, on_grid, shift.unsqueeze(1).expand(-1, n, -1),
                                         need_dlog=True)
    steps = wrap_difference(h.diff(dim=1), torch.zeros(()))
    assert (steps > 0).all()
    torch.testing.assert_close(steps.sum(1), torch.full((1, 3), TWO_PI, dtype=torch.float64))
    lipschitz = TWO_PI / (n - 1) * dlog.abs().amax(1, keepdim=True)
    assert (log_deriv.diff(dim=1).abs() <= 1.5 * lipschitz).all()
    assert lipschitz.max() < 0.05  # so that the bound means something
    # u = 0 and u = 2π are the same point: the same value (mod 2π) and the same derivative,
    # also approached from either side.
    assert wrap_difference(h[:, 0], h[:, -1]).abs().max() < 1e-12
    torch.testing.assert_close(log_deriv[:, 0], log_deriv[:, -1], rtol=0, atol=1e-12)
    sides = [circular_spline(torch.full((1, 3), a, dtype=torch.float64), knots, shift)
             for a in (TWO_PI - 1e-9, 1e-9)]
    assert wrap_difference(sides[0][0], sides[1][0]).abs().max() < 1e-7
    assert (sides[0][1] - sides[1][1]).abs().max() < 1e-6


SEAM = [0.0, 1e-7, 1e-6, TWO_PI - 1e-6, TWO_PI - 1e-7, TWO_PI, -1e-9, -1e-7, 1.0]


@pytest.mark.parametrize("shift", [0.0, -1e-7, 1e-7, math.pi])
def test_float32_near_the_seam(shift):
    """Angles at and next to 0 ≡ 2π map into [0, 2π) in float32 (never onto 2π itself), agree
    with float64 to float32 round-off, and invert back (mod 2π)."""
    u = torch.tensor(SEAM).view(-1, 1).expand(-1, 4)
    raw = [torch.randn(len(SEAM), 6, 4, dtype=torch.float64) for _ in range(3)]
    out = {}
    for dtype in (torch.float64, torch.float32):
        knots = circular_knots(*(r.to(dtype) for r in raw))
        t = torch.full(u.shape, shift, dtype=dtype)
        h, log_deriv, dlog = circular_spline(u.to(dtype), knots, t, need_dlog=True)
        assert ((h >= 0) & (h < TWO_PI)).all() and (h < torch.tensor(TWO_PI, dtype=dtype)).all()
        assert torch.isfinite(log_deriv).all() and torch.isfinite(dlog).all()
        back, log_deriv_back = circular_spline_inverse(h, knots, t)
        assert ((back >= 0) & (back < torch.tensor(TWO_PI, dtype=dtype))).all()
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert wrap_difference(back.double(), u.to(dtype).double()).abs().max() < tol
        # log h' at the inverted point moves with the round-off of u, by (log h')' per radian.
        assert ((log_deriv_back - log_deriv).abs() <= tol * (1 + dlog.abs())).all()
        out[dtype] = h.double()
    assert wrap_difference(out[torch.float32], out[torch.float64]).abs().max() < 1e-5


def test_float32_flow_keeps_links_in_range_near_the_seam():
    flow = random_flow("u1-spline", (8, 8)).float()
    z = flow.sample_prior(len(SEAM))
    seam = torch.tensor(SEAM, dtype=torch.float32)
    z[:, 0, ::2, ::3] = mod_2pi(seam).view(-1, 1, 1)
    z[:, 1, 1::2] = seam.clamp(0, TWO_PI - 1e-6).view(-1, 1, 1)
    x, log_q = flow(z)
    assert ((x >= 0) & (x < torch.tensor(TWO_PI))).all() and torch.isfinite(log_q).all()
    z_back, log_q_back = flow.inverse(x)
    assert ((z_back >= 0) & (z_back < torch.tensor(TWO_PI))).all()
    assert wrap_difference(z_back.double(), z.double()).abs().max() < 1e-4
    assert (log_q_back - log_q).abs().max() < 1e-3


@pytest.mark.parametrize("prior", ["uniform", "plaquette"])
def test_fresh_spline_flow_is_the_identity(prior):
    flow = build_flow("u1", (8, 8), {"transform": "spline", "prior": prior},
                      {"beta": 2.0}).double()
    z = flow.sample_prior(3)
    x, log_q = flow(z)
    assert wrap_difference(x, z).abs().max() < 1e-12
    torch.testing.assert_close(log_q, flow.prior.log_prob(z), rtol=0, atol=1e-10)


def test_constructor_choices():
    assert DEFAULT_ARCHITECTURE["u1"]["transform"] == "ncp"
    flow = u1_equivariant((4, 4), n_couplings=2, transform="spline", n_bins=5, prior="uniform")
    assert all(isinstance(c, PlaquetteSplineCoupling) for c in flow.couplings)
    assert flow.couplings[0].net[-1].conv.out_channels == 3 * 5 + 1
    with pytest.raises(ValueError, match="transform"):
        u1_equivariant((4, 4), transform="affine", prior="uniform")


def test_checkpoints_from_before_the_transform_key_still_match():
    """A U(1) checkpoint written before ``transform`` and ``n_bins`` existed trained NCP maps:
    its recipe still matches an NCP recipe (resume, lineage, init_from), not a spline one."""
    ncp = recipe_from_dict({"name": "u1", "action": {"theory": "u1", "beta": 2.0},
                            "lattice": [8, 8],
                            "flow": {"prior": "uniform"}})
    spline = recipe_from_dict({**ncp.to_dict(), "flow": {**ncp.to_dict()["flow"],
                                                          "transform": "spline"}})
    old_flow = {k: v for k, v in ncp.architecture_dict().items()
                if k not in ("transform", "n_bins")}
    state = {"theory": "u1", "recipe": {**ncp.to_dict(), "flow": old_flow},
             "architecture": old_flow}
    refuse_other_recipe(state, ncp, "differs in {differences}")
    check_init_from(state, ncp, Path("old.pt"))
    with pytest.raises(LatticeflowError, match="flow.transform"):
        refuse_other_recipe(state, spline, "differs in {differences}")
    with pytest.raises(LatticeflowError, match="transform"):
        check_init_from(state, spline, Path("old.pt"))
