"""Ensembles against exact results: free-field propagator and 2D U(1) plaquette and χ_t.

The neural-MCMC tests train flows for minutes and are marked slow
(``pytest -m slow tests/test_physics.py``); the HMC ones take seconds and run by default.
Tolerance: every comparison is |estimate − exact| < 4 σ with σ the Γ-method error of the
estimate (autocorrelations included); with a handful of comparisons per test, a false alarm
has probability below ~1e-3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latticeflow import exact
from latticeflow.config import load_recipe
from latticeflow.observables import correlator_per_config, plaquette_mean, topological_charge
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.statistics import gamma_method
from latticeflow.training import open_trainer

FREE = 'theory = "phi4"\nform = "standard"\nm2 = 1.0\nlam = 0.0\n'
U1 = 'theory = "u1"\nbeta = 2.0\n'


def _train(tmp_path: Path, card: str, lattice: str, steps: int, flow: str = ""):
    (tmp_path / "card.toml").write_text(card)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(
        f'action = "card.toml"\nlattice = {lattice}\ndevice = "cpu"\nseed = 1\n{flow}'
        f"[training]\nsteps = {steps}\nbatch_size = 256\nlr = 2e-3\nschedule = \"cosine\"\n"
        "ess_interval = 100\ncheckpoint_interval = 10000\n")
    trainer = open_trainer(load_recipe(recipe_file), tmp_path / "run")
    trainer.train()
    return trainer.flow.eval(), trainer.recipe.action()


def _hmc(card_action, lattice, n, seed=0):
    config = HMCConfig(step_size=0.2, trajectory_length=1.0, integrator="omelyan", n_chains=8,
                       n_therm=200, target_accept=0.85)
    sampler = HMCSampler(card_action, lattice, config, seed)
    rows = sampler.advance(n)
    return rows["configs"], rows["chain"]


def _replicas(series: np.ndarray, chain: np.ndarray | None) -> list[np.ndarray]:
    if chain is None:
        return [series]
    return [series[chain == c] for c in np.unique(chain)]


def _check_free_field(configs: np.ndarray, chain, m2: float, lattice) -> None:
    g_exact = exact.free_two_point(lattice, m2)
    g_conf = correlator_per_config(torch.as_tensor(configs, dtype=torch.float64)).numpy()
    for y in [(0, 0), (1, 0), (2, 1), (4, 4)]:
        result = gamma_method(_replicas(g_conf[(slice(None), *y)], chain))
        assert abs(result.value - g_exact[y]) < 4 * result.error, (y, result.value, g_exact[y])


def _check_u1(configs: np.ndarray, chain, beta: float, lattice) -> None:
    links = torch.as_tensor(configs, dtype=torch.float64)
    plaq = plaquette_mean(links).numpy()
    q2 = topological_charge(links).round().numpy() ** 2
    volume = lattice[0] * lattice[1]
    p = gamma_method(_replicas(plaq, chain))
    chi = gamma_method(_replicas(q2 / volume, chain))
    assert abs(p.value - exact.u1_mean_plaquette(beta, lattice)) < 4 * p.error
    assert abs(chi.value - exact.u1_topological_susceptibility(beta, lattice)) < 4 * chi.error


def test_free_field_hmc_propagator():
    from latticeflow.theories import Phi4

    configs, chain = _hmc(Phi4(1.0, 0.0), (8, 8), 16000)
    _check_free_field(configs, chain, 1.0, (8, 8))


@pytest.mark.slow
def test_free_field_neural_mcmc_propagator(tmp_path):
    flow, action = _train(tmp_path, FREE, "[8, 8]", 600)
    rows = FlowMetropolis(flow, action, seed=2, batch_size=2000).advance(40000)
    assert rows["accepted"].mean() > 0.2
    _check_free_field(rows["configs"], None, 1.0, (8, 8))


def test_u1_hmc_plaquette_and_susceptibility():
    from latticeflow.theories import U1Wilson

    configs, chain = _hmc(U1Wilson(2.0), (8, 8), 16000)
    _check_u1(configs, chain, 2.0, (8, 8))


@pytest.mark.slow
def test_u1_neural_mcmc_plaquette_and_susceptibility(tmp_path):
    # 4×4: a flow trained for minutes on a CPU reaches a useful acceptance there (at 8×8 it
    # needs far longer); the exact finite-volume formulas hold for any L.
    flow, action = _train(tmp_path, U1, "[4, 4]", 600, '[flow]\nn_couplings = 8\n')
    rows = FlowMetropolis(flow, action, seed=2, batch_size=2000).advance(30000)
    assert rows["accepted"].mean() > 0.1
    _check_u1(rows["configs"], None, 2.0, (4, 4))
