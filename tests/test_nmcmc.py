import numpy as np
import pytest
import torch
from flow_helpers import FlowDensityAction, random_flow

from latticeflow.flows import build_flow
from latticeflow.samplers.nmcmc import FlowMetropolis, independence_chain
from latticeflow.statistics import gamma_method


def _reference_chain(log_weight, log_u, current):
    """Plain per-sample Metropolis loop, one chain at a time."""
    steps, chains = log_weight.shape
    state = np.full((steps, chains), -1)
    accepted = np.zeros((steps, chains), dtype=bool)
    for c in range(chains):
        lw, idx = current[c], -1
        for t in range(steps):
            if np.log(np.exp(log_u[t, c])) < log_weight[t, c] - lw:
                lw, idx = log_weight[t, c], t
                accepted[t, c] = True
            state[t, c] = idx
    return accepted, state


def test_vectorised_recursion_matches_per_sample_loop():
    rng = np.random.default_rng(0)
    lw = rng.normal(size=(300, 3))
    log_u = np.log(rng.random((300, 3)))
    current = rng.normal(size=3)
    accepted, state = independence_chain(lw, log_u, current)
    ref_accepted, ref_state = _reference_chain(lw, log_u, current)
    np.testing.assert_array_equal(accepted, ref_accepted)
    np.testing.assert_array_equal(state, ref_state)
    assert 0.2 < accepted.mean() < 0.8


@pytest.mark.parametrize("chains", [1, 3])
def test_rows_are_consistent(chains):
    target = FlowDensityAction(random_flow("phi4", (4, 4), seed=5))
    sampler = FlowMetropolis(random_flow("phi4", (4, 4), seed=1), target, seed=0,
                             batch_size=50, n_chains=chains, store_dtype=torch.float64)
    rows = sampler.advance(120 * chains)
    x = torch.as_tensor(rows["configs"])
    torch.testing.assert_close(torch.as_tensor(rows["action"]), target(x))
    np.testing.assert_allclose(rows["log_weight"], -rows["action"] - rows["log_q"])
    for c in range(chains):
        mine = rows["configs"][c::chains]
        moved = np.any(mine[1:] != mine[:-1], axis=tuple(range(1, mine.ndim)))
        np.testing.assert_array_equal(moved, rows["accepted"][c::chains][1:])
    if chains > 1:
        np.testing.assert_array_equal(rows["chain"], np.tile(np.arange(chains), 120))


def test_resume_reproduces_uninterrupted_run_whatever_the_chunking():
    flow = random_flow("u1", (4, 4), seed=1)
    target = FlowDensityAction(random_flow("u1", (4, 4), seed=5))

    def fresh():
        return FlowMetropolis(flow, target, seed=3, batch_size=64, n_chains=2)

    whole = fresh().advance(400)
    first = fresh()
    part = [first.advance(130), first.advance(70)]
    second = FlowMetropolis(flow, target, seed=999, batch_size=64, n_chains=2)
    second.load_state_dict(first.state_dict())
    part += [second.advance(90), second.advance(110)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in part]), whole[key])


def test_poor_flow_still_gives_unbiased_expectations():
    """An untrained (identity) flow proposing for a different density: low acceptance, but
    the chain's means agree with exact samples of the target within a few standard errors."""
    target_flow = random_flow("phi4", (4, 4), seed=5, std=0.1)
    target = FlowDensityAction(target_flow)
    poor = build_flow("phi4", (4, 4), {"n_couplings": 2, "hidden": [4]}).double()
    sampler = FlowMetropolis(poor, target, seed=0, batch_size=4000)
    rows = sampler.advance(40000)
    acceptance = rows["accepted"].mean()
    assert acceptance < 0.4
    with torch.no_grad():
        exact = target_flow.sample(40000)[0].numpy()

    def observables(x):
        m = x.mean(axis=(1, 2))
        return np.column_stack([m, m**2, (x**2).mean(axis=(1, 2))])

    chain_obs, exact_obs = observables(rows["configs"]), observables(exact)
    for k in range(3):
        mc = gamma_method(chain_obs[:, k])
        ex = gamma_method(exact_obs[:, k])
        pull = (mc.value - ex.value) / np.hypot(mc.error, ex.error)
        assert abs(pull) < 4, (k, mc.value, ex.value, pull)
