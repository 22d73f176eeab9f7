import math

import pytest
import torch
from flow_helpers import ARCHS, PARAMS, random_flow, theory_of, wrap_difference

from latticeflow.flows import build_flow
from latticeflow.flows.ncp import NCPParams, ncp, ncp_inverse
from latticeflow.flows.rootfind import default_tolerance
from latticeflow.lattice import gauge_transform

THEORIES = ["phi4", "phi4-fourier", "phi4-spline", "phi4-spline-z2", "phi4-multiscale",
            "phi4-heatbath", "u1", "u1-spline"]


def _difference(theory, a, b):
    return wrap_difference(a, b) if theory_of(theory) == "u1" else a - b


@pytest.mark.parametrize("theory", THEORIES)
def test_round_trip(theory):
    flow = random_flow(theory, (8, 8))
    x, log_q = flow(flow.sample_prior(6))  # the flow's own map (no heat-bath completion)
    z, log_q_inverse = flow.inverse(x)
    x_again, log_q_again = flow(z)
    assert _difference(theory, x_again, x).abs().max() < 1e-10
    torch.testing.assert_close(log_q_inverse, log_q, rtol=0, atol=1e-9)
    torch.testing.assert_close(log_q_again, log_q, rtol=0, atol=1e-9)


@pytest.mark.parametrize("theory", THEORIES)
def test_log_det_matches_brute_force_jacobian(theory):
    flow = random_flow(theory, (4, 4))
    for _ in range(3):
        z = flow.sample_prior(1)

        def f(v):
            return flow(v.view(1, *flow.field_shape))[0].flatten()

        jac = torch.autograd.functional.jacobian(f, z.flatten())
        log_det = torch.linalg.slogdet(jac).logabsdet
        _, log_q = flow(z)
        assert flow.prior.log_prob(z).item() - log_q.item() == pytest.approx(log_det.item(),
                                                                             abs=1e-9)


@pytest.mark.parametrize("theory", ["u1", "u1-spline"])
def test_u1_gauge_equivariance(theory):
    flow = random_flow(theory, (8, 8))
    z = flow.sample_prior(4)
    alpha = 2 * math.pi * torch.rand(4, 8, 8)
    x, log_q = flow(z)
    x_of_gauged, log_q_gauged = flow(gauge_transform(z, alpha))
    assert wrap_difference(x_of_gauged, gauge_transform(x, alpha)).abs().max() < 1e-10
    torch.testing.assert_close(log_q_gauged, log_q, rtol=0, atol=1e-10)
    torch.testing.assert_close(flow.log_prob(gauge_transform(x, alpha)), log_q, rtol=0,
                               atol=1e-9)


@pytest.mark.parametrize(("theory", "period", "lattice_axes"), [("phi4", 2, (1, 2)),
                                                                ("u1", 4, (2, 3)),
                                                                ("u1-spline", 4, (2, 3))])
def test_translation_equivariance_by_mask_period(theory, period, lattice_axes):
    flow = random_flow(theory, (8, 8))
    z = flow.sample_prior(3)
    x, log_q = flow(z)
    for axis in lattice_axes:
        shifted_x, shifted_log_q = flow(torch.roll(z, period, axis))
        assert _difference(theory, shifted_x, torch.roll(x, period, axis)).abs().max() < 1e-10
        torch.testing.assert_close(shifted_log_q, log_q, rtol=0, atol=1e-10)
    # A shift by one site is not a symmetry of the masks: the check above can fail.
    moved, _ = flow(torch.roll(z, 1, lattice_axes[0]))
    assert _difference(theory, moved, torch.roll(x, 1, lattice_axes[0])).abs().max() > 1e-3


@pytest.mark.parametrize("theory", THEORIES)
def test_weights_do_not_depend_on_lattice_size(theory):
    small = random_flow(theory, (4, 4))
    large = build_flow(theory_of(theory), (8, 8), ARCHS[theory], PARAMS[theory]).double()
    large.load_state_dict(small.state_dict())  # strict: every weight fits
    x, log_q = large.sample(2)
    assert x.shape[-2:] == (8, 8) and torch.isfinite(log_q).all()


@pytest.mark.parametrize("theory", THEORIES)
def test_forward_score_recursion_matches_autograd(theory):
    flow = random_flow(theory, (4, 4))
    z = flow.sample_prior(5)
    x, log_q, score = flow.forward_and_score(z)
    x = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(flow.log_prob(x).sum(), x)
    torch.testing.assert_close(score, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("theory", THEORIES)
def test_inverse_score_recursion_matches_autograd(theory):
    # p♯(z) = p(T(z)) |det J_T(z)|, with p a standard normal on x (any smooth density works).
    flow = random_flow(theory, (4, 4))
    x, _ = flow.sample(5)
    x = x.detach()
    z, log_q, score_z = flow.inverse_and_score(x, -x)
    z_leaf = z.detach().requires_grad_(True)
    x_of_z, log_q_of_z = flow(z_leaf)
    log_pullback = -0.5 * x_of_z.flatten(1).pow(2).sum(1) + flow.prior.log_prob(z_leaf) - log_q_of_z
    (expected,) = torch.autograd.grad(log_pullback.sum(), z_leaf)
    torch.testing.assert_close(score_z, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_q, flow.log_prob(x), rtol=0, atol=1e-9)


def _random_ncp(shape, k=4):
    return NCPParams(torch.randn(shape[0], k, *shape[1:]),
                     torch.softmax(torch.randn(shape[0], k, *shape[1:]), dim=1),
                     torch.randn(shape))


def test_ncp_derivatives_closed_form():
    u = (2 * math.pi * torch.rand(3, 7)).requires_grad_(True)
    p = _random_ncp((3, 7))
    h, dh, d2h = ncp(u, p)
    (auto_dh,) = torch.autograd.grad(h.sum(), u, create_graph=True)
    (auto_d2h,) = torch.autograd.grad(auto_dh.sum(), u)
    torch.testing.assert_close(dh, auto_dh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d2h, auto_d2h, rtol=1e-10, atol=1e-10)
    assert (dh > 0).all()


def test_ncp_inverse_accuracy_and_implicit_gradients():
    p = _random_ncp((2, 5))
    v = 2 * math.pi * torch.rand(2, 5)
    u, target, _ = ncp_inverse(v, p)
    assert ((u >= 0) & (u <= 2 * math.pi)).all()
    h, _, _ = ncp(u, p)
    assert (h - target).abs().max() < 10 * default_tolerance(torch.float64)
    assert wrap_difference(target, v).abs().max() < 1e-12

    # First derivatives through the root finder come from the implicit function theorem.
    def solve(v_, log_scale, logits, shift):
        return ncp_inverse(v_, NCPParams(log_scale, torch.softmax(logits, 1), shift))[0]

    inputs = (v.clone().requires_grad_(True), p.log_scale.clone().requires_grad_(True),
              torch.randn(2, 4, 5).requires_grad_(True), p.shift.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(solve, inputs, eps=1e-6, atol=1e-6)


def test_ncp_float32_round_trip_near_the_seams():
    """In float32, u near π and 2π must not jump by 2π (a branch on u/2 > π/2 did)."""
    n = 4000
    u = 2 * math.pi * torch.rand(n)
    u[: n // 4] = 2 * math.pi - 1e-5 * torch.rand(n // 4)
    u[n // 4: n // 2] = math.pi + 1e-5 * (2 * torch.rand(n // 4) - 1)
    p = _random_ncp((n,))
    h64, _, _ = ncp(u, p)
    p32 = NCPParams(p.log_scale.float(), p.weights.float(), p.shift.float())
    h32, _, _ = ncp(u.float(), p32)
    assert (h32.double() - h64).abs().max() < 1e-5
    back, _, _ = ncp_inverse(h32, p32)
    assert wrap_difference(back.double(), u.float().double()).abs().max() < 1e-4
