"""The heat-bath φ⁴ flow (``[flow] heat_bath``): the flow models the odd sites, the even sites
come from their exact conditional. The generic flow and estimator suites run it as the
``phi4-heatbath`` variant (tests/flow_helpers.py); these tests cover what is its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flow_helpers import PARAMS, random_flow

from latticeflow.base.errors import ConfigError
from latticeflow.cli import main
from latticeflow.config import load_recipe
from latticeflow.estimators import get_estimator
from latticeflow.flows.fourier import SublatticeFourierGaussian
from latticeflow.flows.multiscale import BlockedLayers
from latticeflow.flows.realnvp import AffineCoupling
from latticeflow.lattice import checkerboard
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.statistics import gamma_method
from latticeflow.theories import Phi4

ACTION = Phi4(PARAMS["phi4-heatbath"]["m2"], PARAMS["phi4-heatbath"]["lam"])


def test_layers_move_only_the_odd_sites_and_never_read_the_even_ones():
    flow = random_flow("phi4-heatbath", (8, 8))
    even = checkerboard((8, 8), 0)
    z = flow.sample_prior(3)
    x, log_q = flow(z)
    assert torch.equal(x[:, even], z[:, even])
    assert (x[:, ~even] - z[:, ~even]).abs().max() > 1e-2   # the odd sites do move
    other = torch.where(even, torch.randn_like(z), z)
    x_other, log_q_other = flow(other)
    torch.testing.assert_close(x_other[:, ~even], x[:, ~even], rtol=0, atol=1e-12)
    # only the base density of the placeholders changes
    torch.testing.assert_close(log_q_other - log_q,
                               flow.prior.log_prob(other) - flow.prior.log_prob(z))


def test_samples_carry_the_complete_density_and_the_marginal_weights():
    flow = random_flow("phi4-heatbath", (8, 8))
    x, log_q = flow.sample(5, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    own, log_q_own = flow(flow.sample_prior(5, generator))
    full, log_conditional = flow.heat_bath.complete(own, generator)
    assert torch.equal(full, x)
    torch.testing.assert_close(log_q, log_q_own + log_conditional, rtol=0, atol=1e-10)
    # −S − log q of the complete sampler is −S_marg − log q of the flow's own representation:
    # importance weights (ESS, NMCMC) are the odd sites' marginal weights exactly.
    torch.testing.assert_close(-ACTION(x) - log_q, -flow.heat_bath(own) - log_q_own,
                               rtol=0, atol=1e-9)
    assert flow.training_target(ACTION) is flow.heat_bath


def test_sublattice_base_is_a_translation_invariant_gaussian_of_the_sublattice():
    lattice = (6, 6)
    base = SublatticeFourierGaussian(lattice, 1, n_terms=3, log_coefficients=[0.4, -0.3, 1.0])
    odd = checkerboard(lattice, 1)
    unit = torch.eye(36).view(36, *lattice)
    kernel = base(unit)[0].view(36, 36)           # column j: K applied to the unit vector e_j
    assert torch.equal(kernel[~odd.flatten()][:, ~odd.flatten()], torch.eye(18))
    assert kernel[odd.flatten()][:, ~odd.flatten()].abs().max() < 1e-12
    covariance = (kernel @ kernel.T).view(*lattice, *lattice)
    for step in [(1, 1), (1, -1)]:              # the sublattice's own translations
        moved = torch.roll(covariance, (*step, *step), dims=(0, 1, 2, 3))
        torch.testing.assert_close(moved[odd][:, odd], covariance[odd][:, odd])
    torch.testing.assert_close(covariance.permute(1, 0, 3, 2)[odd][:, odd],   # x₀ ↔ x₁
                               covariance[odd][:, odd])
    log_det = torch.linalg.slogdet(kernel).logabsdet
    torch.testing.assert_close(base.log_det(unit[:1]), log_det.expand(1))


def test_sublattice_level_moves_the_odd_block_means_only():
    torch.manual_seed(2)
    coupling = AffineCoupling(checkerboard((4, 4), 0), [4], 3, "tanh")
    torch.nn.init.normal_(coupling.net[-1].conv.weight, std=0.3)
    level = BlockedLayers((8, 8), (4, 4), [coupling], parity=1).double()
    x = torch.randn(2, 8, 8)
    moved, _ = level(x)
    delta = (moved - x).view(2, 4, 2, 4, 2)
    odd = checkerboard((8, 8), 1).view(4, 2, 4, 2)
    assert delta[:, ~odd].abs().max() == 0
    per_block = delta.permute(0, 1, 3, 2, 4).reshape(2, 16, 4)[:, :, [1, 2]]  # the 2 odd sites
    torch.testing.assert_close(per_block[..., 0], per_block[..., 1])
    assert per_block.abs().max() > 1e-3
    with pytest.raises(ValueError, match="even block volume"):
        BlockedLayers((6, 6), (2, 2), [], parity=1)


def test_neural_mcmc_agrees_with_hmc():
    """NMCMC with a briefly trained heat-bath flow against HMC on 4×4 (λ = 5, m² = −4): means
    of the even and odd sites' φ² and of m² agree within 4 combined Γ-method errors."""
    flow = random_flow("phi4-heatbath", (4, 4), std=0.05)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.01)
    for _ in range(100):          # against the odd sites' marginal, the flow's own target
        out = get_estimator("reverse-fastpath")(flow, flow.training_target(ACTION),
                                                flow.sample_prior(64))
        optimizer.zero_grad()
        out.surrogate.backward()
        optimizer.step()
    rows = FlowMetropolis(flow, ACTION, seed=0, batch_size=4000).advance(40000)
    assert 0.2 < rows["accepted"].mean() < 0.95
    hmc = HMCSampler(ACTION, (4, 4), HMCConfig(step_size=0.2, trajectory_length=1.0,
                                              integrator="omelyan", n_chains=8, n_therm=200,
                                              target_accept=0.85), 0).advance(20000)
    even = checkerboard((4, 4), 0).numpy()

    def observables(x: np.ndarray) -> np.ndarray:
        return np.column_stack([(x[:, even] ** 2).mean(1), (x[:, ~even] ** 2).mean(1),
                                x.mean(axis=(1, 2)) ** 2])

    chain_obs, reference = observables(rows["configs"]), observables(hmc["configs"])
    for k in range(3):
        mc = gamma_method(chain_obs[:, k])
        ref = gamma_method([reference[hmc["chain"] == c, k] for c in range(8)])
        pull = (mc.value - ref.value) / np.hypot(mc.error, ref.error)
        assert abs(pull) < 4, (k, mc.value, ref.value, pull)


def _recipe(tmp_path: Path, flow: str, training: str = "") -> Path:
    path = tmp_path / "hb.toml"
    path.write_text('action = {theory = "phi4", form = "standard", m2 = -4, lam = 5}\n'
                    'lattice = [8, 8]\ndevice = "cpu"\ndtype = "float64"\n'
                    f'[flow]\nheat_bath = true\nn_couplings = 2\nhidden = [4]\n{flow}'
                    f'[training]\nsteps = 3\nbatch_size = 8\ness_batch = 64\n{training}')
    return path


@pytest.mark.parametrize(("flow", "training", "message"), [
    ("", 'estimator = "forward-fastpath"\ndata = "ens.h5"\n', "reverse KL"),
    ("coarse = [8]\n", "", "even number of sites"),
])
def test_recipe_refuses_what_a_heat_bath_flow_cannot_do(tmp_path, flow, training, message):
    (tmp_path / "ens.h5").touch()
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe(tmp_path, flow, training))


def test_a_heat_bath_run_trains_and_samples_the_theory(tmp_path):
    recipe = _recipe(tmp_path, 'base = "fourier"\ncoarse = [4]\ncoarse_couplings = 1\n')
    assert main(["-q", "train", str(recipe)]) == 0
    assert main(["-q", "sample", str(tmp_path / "hb"), "--n", "200"]) == 0
    from latticeflow.api import load_flow
    loaded = load_flow(tmp_path / "hb", device="cpu")
    assert loaded.flow.heat_bath is not None
    x, log_q = loaded.flow.sample(64)
    assert torch.isfinite(loaded.action(x) + log_q).all()
