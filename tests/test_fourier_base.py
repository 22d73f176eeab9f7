"""The Fourier Gaussian base (flows/fourier.py): exact free field, covariance, symmetries, training.

The generic exactness tests (round trip, log-det against the brute-force Jacobian, fast path equal
to the drop-in path, score recursion against autograd, estimators against finite differences) run
on the "phi4-fourier" flow variant in test_flows.py and test_estimators.py.
"""

import math

import numpy as np
import pytest
import torch

from latticeflow.estimators import get_estimator
from latticeflow.exact import free_log_z, free_two_point
from latticeflow.flows import Flow, build_flow
from latticeflow.flows.fourier import FourierGaussian
from latticeflow.flows.priors import NormalPrior
from latticeflow.theories import Phi4


def _base_flow(layer: FourierGaussian) -> Flow:
    return Flow(NormalPrior(layer.lattice), [layer]).double()


def _random_layer(lattice=(6, 6), seed=0) -> FourierGaussian:
    torch.manual_seed(seed)
    return FourierGaussian(lattice, n_terms=3, log_coefficients=[0.3, -0.5, -1.5])


@pytest.mark.parametrize("lattice", [(6, 6), (4, 6), (8,), (4, 4, 4)])
def test_free_field_base_is_exact(lattice):
    # log w = −S − log q is the same for every sample and equals log Z (exact.free_log_z).
    m2 = 0.7
    flow = _base_flow(FourierGaussian.free_field(lattice, m2))
    x, log_q = flow.sample(64)
    log_w = -Phi4(m2, 0.0)(x) - log_q
    assert (log_w - free_log_z(lattice, m2)).abs().max() < 1e-9


def test_free_field_samples_reproduce_the_exact_two_point_function():
    lattice, m2, n = (8, 8), 0.5, 20000
    flow = _base_flow(FourierGaussian.free_field(lattice, m2))
    torch.manual_seed(1)
    with torch.no_grad():
        x = flow.sample(n)[0].numpy()
    # Translation-averaged ⟨φ(y)φ(y + r)⟩ per configuration; configurations are independent.
    spectrum = np.fft.fftn(x, axes=(1, 2))
    per_config = np.fft.ifftn(np.abs(spectrum) ** 2, axes=(1, 2)).real / math.prod(lattice)
    mean, error = per_config.mean(0), per_config.std(0) / math.sqrt(n)
    exact = free_two_point(lattice, m2)
    # 64 separations: with independent samples a 4.5σ bound is passed with probability ≈ 0.9996.
    assert np.abs(mean - exact).max() < 4.5 * error.max()
    assert np.abs((mean - exact) / error).max() < 4.5


def test_samples_reproduce_the_layer_covariance():
    layer = _random_layer((6, 6)).double()
    flow = _base_flow(layer)
    n = 40000
    torch.manual_seed(2)
    with torch.no_grad():
        x = flow.sample(n)[0].flatten(1)
    covariance = x.T @ x / n
    # Exact C = F⁻¹ diag(σ²) F: the circulant whose first row is ifft(σ²).
    two_point = torch.fft.ifftn(layer.variance()).real.flatten()
    sites = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij"), -1)
    sites = sites.reshape(-1, 2)
    separation = (sites[None, :, :] - sites[:, None, :]) % 6
    exact = two_point[separation[..., 0] * 6 + separation[..., 1]]
    # Var(x_i x_j) = C_ii C_jj + C_ij²: the standard error of each entry.
    diag = exact.diagonal()
    error = torch.sqrt((diag[:, None] * diag[None, :] + exact**2) / n)
    # 1296 entries (648 distinct): 5σ keeps the chance of a false alarm below 1e-3.
    assert ((covariance - exact) / error).abs().max() < 5


def test_log_prob_is_the_gaussian_density():
    layer = _random_layer((4, 4)).double()
    flow = _base_flow(layer)
    x = flow.sample(3)[0]
    c = torch.fft.ifftn(layer.variance()).real
    idx = torch.arange(4)
    rows = ((idx[:, None, None, None] - idx[None, None, :, None]) % 4,
            (idx[None, :, None, None] - idx[None, None, None, :]) % 4)
    covariance = c[rows].reshape(16, 16)
    expected = torch.distributions.MultivariateNormal(torch.zeros(16, dtype=torch.float64),
                                                      covariance).log_prob(x.flatten(1))
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-9)


def test_score_matches_finite_differences():
    flow = _base_flow(_random_layer((4, 4)))
    x, _, score = flow.forward_and_score(flow.sample_prior(2))
    x = x.detach()
    eps = 1e-6
    for site in [(0, 0), (1, 3), (2, 2)]:
        step = torch.zeros_like(x)
        step[:, site[0], site[1]] = eps
        fd = (flow.log_prob(x + step) - flow.log_prob(x - step)) / (2 * eps)
        torch.testing.assert_close(score[:, site[0], site[1]], fd, rtol=1e-6, atol=1e-7)


def test_translation_reflection_rotation_and_z2_equivariance():
    layer = _random_layer((6, 6)).double()
    z = torch.randn(3, 6, 6, dtype=torch.float64)
    x, _ = layer(z)
    moves = [
        lambda f: torch.roll(f, 1, 1),                 # by one site, not only the mask period
        lambda f: torch.roll(f, (2, -1), (1, 2)),
        lambda f: torch.flip(f, (1,)),
        lambda f: f.transpose(1, 2),
        lambda f: torch.rot90(f, 1, (1, 2)),
        lambda f: -f,
    ]
    for move in moves:
        torch.testing.assert_close(layer(move(z))[0], move(x), rtol=0, atol=1e-12)


def test_parameters_do_not_depend_on_the_lattice():
    small = _random_layer((4, 4))
    large = FourierGaussian((16, 16))
    large.load_state_dict(small.state_dict())
    torch.testing.assert_close(large.log_sigma(torch.tensor([0.0, 3.0])),
                               small.log_sigma(torch.tensor([0.0, 3.0])))


def test_reverse_kl_learns_the_free_field():
    # From the near-identity start, the fast path estimator fits the free field's variances:
    # the free field is in the family (n_terms = 2), so the ESS must approach 1.
    torch.manual_seed(3)
    lattice, m2 = (4, 4), 1.0
    flow = Flow(NormalPrior(lattice), [FourierGaussian(lattice, n_terms=2)]).double()
    action = Phi4(m2, 0.0)
    estimator = get_estimator("reverse-fastpath")
    opt = torch.optim.Adam(flow.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 800)
    for _ in range(800):
        opt.zero_grad()
        estimator(flow, action, flow.sample_prior(32)).surrogate.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        x, log_q = flow.sample(4096)
    log_w = -action(x) - log_q
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / len(log_w)
    assert ess > 0.999
    torch.testing.assert_close(torch.exp(flow.couplings[0].log_coefficients),
                               torch.tensor([2 * m2, 16.0], dtype=torch.float64), rtol=0.02,
                               atol=0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_terms"):
        FourierGaussian((4, 4), n_terms=0)
    with pytest.raises(ValueError, match="m2 > 0"):
        FourierGaussian.free_field((4, 4), 0.0)


def test_recipe_of_the_base_alone(tmp_path):
    # n_couplings = 0 is the Fourier base alone (its ablation row); without a trainable base the
    # flow would have nothing to train, and the recipe is refused.
    from latticeflow.base.errors import ConfigError
    from latticeflow.config import load_recipe

    card = 'action = {theory = "phi4", m2 = -4.0, lam = 8.0}\nlattice = [8, 8]\n'
    path = tmp_path / "base.toml"
    path.write_text(card + '[flow]\nn_couplings = 0\nbase = "fourier"\n')
    recipe = load_recipe(path)
    flow = build_flow("phi4", recipe.lattice, recipe.architecture_dict())
    assert [type(layer) for layer in flow.couplings] == [FourierGaussian]
    path.write_text(card + "[flow]\nn_couplings = 0\n")
    with pytest.raises(ConfigError, match="n_couplings"):
        load_recipe(path)
