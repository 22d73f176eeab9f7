"""The six estimators: exactness against each other, finite differences, unbiasedness, optimum.

Targets are flow densities S = −log q*(x) (tests/flow_helpers.py): their exact samples come from
q*, and the flow with q* 's own weights is an exact optimum.
"""

import copy

import pytest
import torch
from flow_helpers import FlowDensityAction, random_flow

from latticeflow.estimators import ESTIMATORS, direction, get_estimator
from latticeflow.theories import Phi4, U1Wilson
from latticeflow.theories.phi4_sublattice import Phi4EvenMarginal

THEORIES = ["phi4", "phi4-fourier", "phi4-spline", "phi4-multiscale", "phi4-heatbath", "u1",
            "u1-spline"]
PHYSICAL = {"phi4": Phi4(-1.0, 1.0), "phi4-fourier": Phi4(-1.0, 1.0),
            "phi4-spline": Phi4(-1.0, 1.0), "phi4-multiscale": Phi4(-1.0, 1.0),
            "phi4-heatbath": Phi4EvenMarginal(Phi4(-4.0, 5.0)),
            "u1": U1Wilson(1.5), "u1-spline": U1Wilson(1.5)}


def _batch(flow, name, n, data_flow=None):
    if direction(name) == "reverse":
        return flow.sample_prior(n)
    with torch.no_grad():
        return (data_flow or flow).sample(n)[0]


def _gradient(flow, name, action, batch):
    flow.zero_grad()
    get_estimator(name)(flow, action, batch).surrogate.backward()
    return torch.cat([p.grad.flatten() for p in flow.parameters()])


@pytest.mark.parametrize("theory", THEORIES)
@pytest.mark.parametrize("way", ["reverse", "forward"])
def test_fast_path_equals_drop_in_path(theory, way):
    flow = random_flow(theory, (8, 8))
    action = PHYSICAL[theory]
    batch = _batch(flow, f"{way}-fastpath", 16, random_flow(theory, (8, 8), seed=7))
    fast = _gradient(flow, f"{way}-fastpath", action, batch)
    drop = _gradient(flow, f"{way}-droppath", action, batch)
    offset = 0
    for p in flow.parameters():
        f, d = fast[offset:offset + p.numel()], drop[offset:offset + p.numel()]
        offset += p.numel()
        assert (f - d).norm() <= 1e-8 * d.norm() + 1e-12 * drop.norm()


def _own_objective(name, flow, frozen, action, batch):
    """The function whose gradient each estimator claims to be (parameters of ``flow`` vary)."""
    if name == "reverse-standard":
        x, log_q = flow(batch)
        return (log_q + action(x)).mean()
    if name == "forward-standard":
        return -flow.log_prob(batch).mean()
    # Path gradients: vary the sampling path T_θ(z), keep the density log q at θ₀ fixed.
    z = batch if direction(name) == "reverse" else frozen.inverse(batch)[0]
    x, _ = flow(z)
    return (frozen.log_prob(x) + action(x)).mean()


@pytest.mark.parametrize("theory", THEORIES)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_gradient_matches_finite_differences(theory, name):
    flow = random_flow(theory, (4, 4))
    frozen = copy.deepcopy(flow)
    action = PHYSICAL[theory]
    batch = _batch(flow, name, 4, random_flow(theory, (4, 4), seed=3))
    grad = _gradient(flow, name, action, batch)
    params = list(flow.parameters())
    base = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        direction_ = [torch.randn(p.shape, generator=gen) for p in params]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, p0, v in zip(params, base, direction_, strict=True):
                    p.copy_(p0 + sign * 1e-6 * v)
                values.append(_own_objective(name, flow, frozen, action, batch).item())
        with torch.no_grad():
            for p, p0 in zip(params, base, strict=True):
                p.copy_(p0)
        fd = (values[0] - values[1]) / 2e-6
        analytic = float(grad @ torch.cat([v.flatten() for v in direction_]))
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("theory", THEORIES)
@pytest.mark.parametrize("way", ["reverse", "forward"])
def test_estimators_agree_in_expectation(theory, way):
    """Paired comparison on the same batches: E[g_standard − g_path] = 0 along fixed directions.

    The difference is the score term, whose expectation vanishes; with 100 batches its mean is
    compared with its standard error (|z| < 4 for each of 3 directions: a false alarm rate
    below 2e-4).
    """
    target = FlowDensityAction(random_flow(theory, (4, 4), seed=5))
    flow = random_flow(theory, (4, 4), seed=1, std=0.1)
    n_params = sum(p.numel() for p in flow.parameters())
    directions = torch.randn(n_params, 3)
    diffs = []
    for _ in range(100):
        batch = _batch(flow, f"{way}-standard", 8, target.flow)
        diffs.append((_gradient(flow, f"{way}-standard", target, batch)
                      - _gradient(flow, f"{way}-fastpath", target, batch)) @ directions)
    diffs = torch.stack(diffs)
    z_scores = diffs.mean(0) / (diffs.std(0) / len(diffs) ** 0.5)
    assert z_scores.abs().max() < 4, z_scores
    # The paired difference is not trivially zero: the estimators really differ per batch.
    assert diffs.std(0).min() > 0


@pytest.mark.parametrize("theory", THEORIES)
def test_path_gradients_vanish_per_sample_at_the_optimum(theory):
    optimum = random_flow(theory, (4, 4), seed=2)
    target = FlowDensityAction(copy.deepcopy(optimum))
    for name in ESTIMATORS:
        for _ in range(3):
            batch = _batch(optimum, name, 1, target.flow)
            grad = _gradient(optimum, name, target, batch)
            if name.endswith("standard"):
                assert grad.norm() > 1e-3, name
            else:
                assert grad.norm() < 1e-9, (name, grad.norm())
