"""Couplings on blocked lattices (flows/multiscale.py): the blocking, the flow's symmetries, and
the recipe keys. Round trips, log-determinants, the score recursion and the fast path of the
multiscale flow are checked with every other flow in test_flows.py and test_estimators.py
(variant ``phi4-multiscale``)."""

import pytest
import torch
from flow_helpers import random_flow

from latticeflow.base.errors import ConfigError
from latticeflow.config import load_recipe
from latticeflow.flows import build_flow
from latticeflow.flows.multiscale import BlockedLayers, block_sizes


def _blocked(lattice=(8, 4), coarse=(2, 2)) -> BlockedLayers:
    return BlockedLayers(lattice, coarse, [])


def test_block_sum_and_upsample_are_adjoint_and_undo_each_other():
    layer = _blocked()
    x, c = torch.randn(3, 8, 4, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close((layer.block_sum(x) * c).sum(), (x * layer.upsample(c)).sum())
    torch.testing.assert_close(layer.block_sum(layer.upsample(c)) / layer.volume, c)
    # block (1, 0) of the coarse lattice holds the sites 4..7 along axis 0 and 0..1 along axis 1
    torch.testing.assert_close(layer.block_sum(x)[:, 1, 0], x[:, 4:8, 0:2].sum((1, 2)))


def test_block_sizes_reject_coarse_lattices_that_do_not_divide():
    assert block_sizes((8, 4), (2, 4)) == (4, 1)
    with pytest.raises(ValueError, match="does not block"):
        block_sizes((8, 6), (4, 4))


def test_coarse_levels_move_only_the_block_means():
    flow = random_flow("phi4-multiscale", (8, 8))
    blocked = flow.couplings[1]
    assert isinstance(blocked, BlockedLayers) and blocked.blocks == (4, 4)
    x = torch.randn(4, 8, 8, dtype=torch.float64)
    y, _ = blocked(x)
    detail = x - blocked.upsample(blocked.block_sum(x) / blocked.volume)
    moved = y - blocked.upsample(blocked.block_sum(y) / blocked.volume)
    torch.testing.assert_close(moved, detail)
    assert (blocked.block_sum(y) - blocked.block_sum(x)).abs().max() > 1e-3


def test_fresh_coarse_levels_are_the_identity():
    flow = build_flow("phi4", (8, 8), {"transform": "spline", "coarse": [2, 4]}).double()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    for level in flow.couplings[:2]:
        y, log_det = level(x)
        torch.testing.assert_close(y, x)
        assert log_det.abs().max() < 1e-12


@pytest.mark.parametrize("z2", [False, True])
def test_translation_by_two_coarse_blocks_and_z2(z2):
    # blocks of 4 and 2 sites: the coarsest checkerboard repeats after 8 sites, not after 4
    torch.manual_seed(0)
    flow = build_flow("phi4", (16, 16), {"transform": "spline", "base": "fourier", "hidden": [4],
                                         "n_couplings": 2, "coarse": [4, 8],
                                         "coarse_couplings": 2, "z2": z2}).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.15)
    z = flow.sample_prior(3)
    x, log_q = flow(z)
    for axis in (1, 2):
        shifted, shifted_log_q = flow(torch.roll(z, 8, axis))
        torch.testing.assert_close(shifted, torch.roll(x, 8, axis))
        torch.testing.assert_close(shifted_log_q, log_q)
        moved, _ = flow(torch.roll(z, 4, axis))
        assert (moved - torch.roll(x, 4, axis)).abs().max() > 1e-3
    flipped, flipped_log_q = flow(-z)
    if z2:
        torch.testing.assert_close(flipped, -x)
        torch.testing.assert_close(flipped_log_q, log_q)
    else:
        assert (flipped + x).abs().max() > 1e-3


def _recipe(tmp_path, flow_lines: str):
    path = tmp_path / "r.toml"
    path.write_text('action = {theory = "phi4", form = "standard", m2 = -4, lam = 8}\n'
                    'lattice = [16, 16]\n[flow]\ntransform = "spline"\nbase = "fourier"\n'
                    + flow_lines)
    return load_recipe(path)


def test_recipe_keys(tmp_path):
    recipe = _recipe(tmp_path, "coarse = [2, 8]\ncoarse_couplings = 3\n")
    assert recipe.architecture["coarse"] == (2, 8)
    assert recipe.architecture["coarse_couplings"] == 3
    assert _recipe(tmp_path, "").architecture["coarse"] == ()
    for bad, why in [("[6]", "not a coarse extent"), ("[3]", "not a coarse extent"),
                     ("[8, 4]", "must increase"), ("[4, 4]", "must increase"),
                     ('["4"]', "list of integers")]:
        with pytest.raises(ConfigError, match=why):
            _recipe(tmp_path, f"coarse = {bad}\n")
    with pytest.raises(ConfigError, match="only applies to the phi4 flow"):
        path = tmp_path / "u.toml"
        path.write_text('action = {theory = "u1", beta = 2.0}\nlattice = [8, 8]\n'
                        '[flow]\ncoarse = [4]\n')
        load_recipe(path)


def test_score_matches_finite_differences():
    flow = random_flow("phi4-multiscale", (8, 8))
    x, _, score = flow.forward_and_score(flow.sample_prior(3))
    x = x.detach()
    direction = torch.randn_like(x)
    h = 1e-5
    with torch.no_grad():
        slope = (flow.log_prob(x + h * direction) - flow.log_prob(x - h * direction)) / (2 * h)
    torch.testing.assert_close(slope, (score * direction).flatten(1).sum(1), rtol=1e-6,
                               atol=1e-6)
