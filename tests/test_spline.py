"""Rational-quadratic splines (flows/spline.py) and the φ⁴ spline coupling.

The flow-level exactness tests (round trip, brute-force log-det, score recursion, fast path equal
to the drop-in path, the six estimators against finite differences) run on the "phi4-spline"
variant in test_flows.py and test_estimators.py, and on "phi4-spline-z2" in test_flows.py.
"""

import pytest
import torch

from latticeflow.flows import build_flow
from latticeflow.flows.spline import real_line_knots, real_line_spline, real_line_spline_inverse

BOUND = 2.0


def _knots(n=5, k=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(n, m, 3, generator=g, dtype=dtype) for m in (k, k, k - 1)]
    return real_line_knots(*raw, BOUND)


def test_derivatives_match_autograd():
    knots = _knots()
    x = (3 * torch.rand(5, 3, dtype=torch.float64) - 1.5).requires_grad_(True)
    y, log_deriv, dlog = real_line_spline(x, knots, BOUND, need_dlog=True)
    (dy,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    torch.testing.assert_close(log_deriv, torch.log(dy), rtol=0, atol=1e-12)
    (dlog_auto,) = torch.autograd.grad(torch.log(dy).sum(), x)
    torch.testing.assert_close(dlog, dlog_auto, rtol=1e-9, atol=1e-9)


def test_monotone_c1_and_identity_outside():
    # One spline per column, evaluated on a fine grid of 20001 points along axis 1.
    g = torch.Generator().manual_seed(1)
    raw = [torch.randn(1, m, 1, 3, generator=g, dtype=torch.float64).expand(1, m, 20001, 3)
           for m in (5, 5, 4)]
    knots = real_line_knots(*raw, BOUND)
    x = torch.linspace(-3, 3, 20001, dtype=torch.float64).view(1, -1, 1).expand(1, -1, 3)
    y, log_deriv, _ = real_line_spline(x, knots, BOUND)
    assert (y.diff(dim=1) > 0).all()
    outside = x.abs() >= BOUND
    assert torch.equal(y[outside], x[outside])
    # y' is continuous: neighbouring grid points differ by O(grid step) everywhere, knots and
    # the joins with the identity tails included.
    assert log_deriv.diff(dim=1).abs().max() < 0.05


def test_inverse_round_trip_float64_and_float32():
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        knots = _knots(dtype=dtype)
        x = 5 * torch.rand(5, 3, dtype=dtype) - 2.5
        y, log_deriv, _ = real_line_spline(x, knots, BOUND)
        x_back, log_deriv_back = real_line_spline_inverse(y, knots, BOUND)
        assert (x_back - x).abs().max() < tol
        assert (log_deriv_back - log_deriv).abs().max() < 10 * tol


def test_fresh_spline_flow_is_the_identity():
    flow = build_flow("phi4", (4, 4), {"transform": "spline"}).double()
    z = flow.sample_prior(3)
    x, log_q = flow(z)
    torch.testing.assert_close(x, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_q, flow.prior.log_prob(z), rtol=0, atol=1e-10)


def test_mirrored_knots_give_the_reflected_spline():
    """The Z₂ construction's premise: the spline of the mirrored raw parameters is −S(−x)."""
    g = torch.Generator().manual_seed(2)
    raw = [torch.randn(5, m, 3, generator=g, dtype=torch.float64) for m in (6, 6, 5)]
    mirrored = [r.flip(1) for r in raw]
    x = 3 * torch.rand(5, 3, generator=g, dtype=torch.float64) - 1.5
    y, log_deriv, _ = real_line_spline(x, real_line_knots(*raw, BOUND), BOUND)
    y_m, log_deriv_m, _ = real_line_spline(-x, real_line_knots(*mirrored, BOUND), BOUND)
    torch.testing.assert_close(y_m, -y, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_deriv_m, log_deriv, rtol=0, atol=1e-12)


@pytest.mark.parametrize("base", ["normal", "fourier"])
def test_z2_flow_commutes_with_the_field_flip(base):
    """With z2 = true and random weights, T(−z) = −T(z) and log q(−x) = log q(x); without it
    the same weights break the symmetry (so the test can fail)."""
    for z2, symmetric in ((True, True), (False, False)):
        torch.manual_seed(0)
        arch = {"transform": "spline", "n_couplings": 4, "hidden": [4], "n_bins": 4,
                "spline_bound": 1.5, "base": base, "z2": z2}
        flow = build_flow("phi4", (4, 4), arch).double()
        with torch.no_grad():
            for p in flow.parameters():
                p.normal_(0.0, 0.3)
            z = flow.sample_prior(6, torch.Generator().manual_seed(1))
            x, log_q = flow(z)
            x_flip, log_q_flip = flow(-z)
        close = (torch.allclose(x_flip, -x, rtol=0, atol=1e-10)
                 and torch.allclose(log_q_flip, log_q, rtol=0, atol=1e-10))
        assert close == symmetric


def test_z2_needs_the_spline_transform():
    with pytest.raises(ValueError, match="z2"):
        build_flow("phi4", (4, 4), {"z2": True})
