"""The fast path's per-coupling VJP in closed form equals autograd's, piece by piece and whole."""

from __future__ import annotations

import math

import pytest
import torch

from latticeflow.flows import build_flow
from latticeflow.flows.conditioner import ACTIVATIONS, PeriodicConv, conv_net, input_vjp, recorded
from latticeflow.flows.ncp import NCPParams, ncp, ncp_log_deriv_vjp


def _autograd_vjp(fn, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (out,) = torch.autograd.grad(fn(x), x, grad_outputs=grad)
    return out


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_conditioner_input_vjp_matches_autograd(activation, ndim):
    torch.manual_seed(0)
    net = conv_net(ndim, 2, 3, [4, 5], 3, activation, zero_init=False).double()
    x = torch.randn(3, 2, *[4, 6, 5][:ndim])
    grad = torch.randn(3, 3, *x.shape[2:])
    closed = input_vjp(net, recorded(net, x), grad)
    torch.testing.assert_close(closed, _autograd_vjp(net, x, grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [2, 3])
def test_conv_at_rows_input_vjp_matches_autograd(axis):
    torch.manual_seed(1)
    conv = PeriodicConv(2, 3, 4, 3).double()
    x = torch.randn(2, 3, 8, 12)
    n = x.shape[axis]
    windows = conv.windows(torch.arange(1, n, 4), n)
    grad = torch.randn_like(conv.at_rows(x, axis, windows))
    closed = conv.at_rows_input_vjp(grad, x.shape, axis, windows)
    expected = _autograd_vjp(lambda t: conv.at_rows(t, axis, windows), x, grad)
    torch.testing.assert_close(closed, expected, rtol=1e-12, atol=1e-12)


def test_ncp_log_deriv_vjp_matches_autograd():
    torch.manual_seed(2)
    u = (2 * math.pi * torch.rand(3, 7)).requires_grad_(True)
    log_scale, weights, shift = (torch.randn(3, 4, 7).requires_grad_(True),
                                 torch.softmax(torch.randn(3, 4, 7), 1).requires_grad_(True),
                                 torch.randn(3, 7).requires_grad_(True))
    grad_h = torch.randn(3, 7)
    h, dh, _ = ncp(u, NCPParams(log_scale, weights, shift), need_second=False)
    expected = torch.autograd.grad((grad_h * h + torch.log(dh)).sum(),
                                   (u, log_scale, weights, shift))
    closed = ncp_log_deriv_vjp(u.detach(), NCPParams(log_scale.detach(), weights.detach(),
                                                     shift.detach()), grad_h)
    for c, e in zip(closed, expected, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-12)


FLOWS = [("phi4", (4, 6), {"hidden": [4, 3], "activation": a}) for a in sorted(ACTIVATIONS)] + [
    ("u1", (8, 4), {"n_mixture": 3, "hidden": [4, 3], "loop_length": n, "activation": a})
    for n, a in [(1, "leaky_relu"), (2, "gelu"), (3, "tanh"), (4, "silu")]]


def _random_flow(theory, lattice, arch):
    torch.manual_seed(3)
    flow = build_flow(theory, lattice, {"n_couplings": 4, **arch},
                      {"beta": 1.5} if theory == "u1" else None).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.3)
    return flow


@pytest.mark.parametrize("theory,lattice,arch", FLOWS)
def test_frozen_vjp_matches_autograd(theory, lattice, arch):
    flow = _random_flow(theory, lattice, arch)
    x = flow.sample_prior(4)
    for coupling in flow.couplings:
        assert coupling.closed_form_vjp
        score = torch.where(coupling.active, torch.randn_like(x), 0.0)
        with torch.no_grad():
            closed = coupling.frozen_vjp(x, coupling.condition(x), score)

        def objective_terms(t, coupling=coupling, score=score):
            u = coupling.transform(t, coupling.condition(t))
            return (u.y * score).sum() + u.log_deriv.sum()

        expected = _autograd_vjp(objective_terms, x, torch.tensor(1.0, dtype=x.dtype))
        frozen = ~coupling.active
        torch.testing.assert_close(closed[:, frozen], expected[:, frozen], rtol=1e-11,
                                   atol=1e-11)
        x = coupling(x)[0].detach()


@pytest.mark.parametrize("theory,lattice,arch", [FLOWS[0], FLOWS[-1]])
def test_score_steps_equal_the_autograd_fallback(theory, lattice, arch, monkeypatch):
    flow = _random_flow(theory, lattice, arch)
    z = flow.sample_prior(3)
    x, log_q, score = flow.forward_and_score(z)
    back = flow.inverse_and_score(x.detach(), -x.detach())
    for coupling in flow.couplings:
        monkeypatch.setattr(coupling, "closed_form_vjp", False)
    x_auto, log_q_auto, score_auto = flow.forward_and_score(z)
    back_auto = flow.inverse_and_score(x.detach(), -x.detach())
    torch.testing.assert_close(x, x_auto, rtol=0, atol=0)
    torch.testing.assert_close(log_q, log_q_auto, rtol=0, atol=0)
    torch.testing.assert_close(score, score_auto, rtol=1e-11, atol=1e-11)
    for closed, auto in zip(back, back_auto, strict=True):
        torch.testing.assert_close(closed, auto, rtol=1e-11, atol=1e-11)
