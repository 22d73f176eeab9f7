"""Recipe chains (``init_from``): run trains missing links first, skips complete ones, refuses
loops and theory changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from latticeflow.base.errors import LatticeflowError
from latticeflow.cli import main
from latticeflow.config import load_recipe
from latticeflow.training import Trainer, read_checkpoint
from latticeflow.training.lineage import lineage_training_seconds
from latticeflow.training.lineage import recipe_lineage as recipe_chain

FLOW = "[flow]\nn_couplings = 2\nn_mixture = 2\nhidden = [2]\n"


def _recipe(beta: float, *, steps: int, init_from: str | None = None, theory: str = "u1",
            lattice: str = "[4, 4]", flow: str = FLOW, floor: bool = False) -> str:
    action = (f'action = {{theory = "u1", beta = {beta}}}' if theory == "u1"
              else 'action = {theory = "phi4", m2 = -4.0, lam = 8.0}')
    chain = "" if init_from is None else f'init_from = "{init_from}"\n'
    return (f"{action}\nlattice = {lattice}\ndtype = \"float64\"\ndevice = \"cpu\"\n{chain}"
            f"{flow}[training]\nsteps = {steps}\nbatch_size = 8\ness_batch = 16\n"
            f"init_floor = {str(floor).lower()}\n"
            f"ess_interval = 1\n[sampling]\nn = 20\nbatch_size = 16\nchunk = 10\n")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ladder(tmp_path: Path) -> Path:
    (tmp_path / "b1.toml").write_text(_recipe(1.0, steps=3))
    (tmp_path / "b2.toml").write_text(_recipe(2.0, steps=2, init_from="b1.toml"))
    (tmp_path / "b3.toml").write_text(_recipe(3.0, steps=0, init_from="b2.toml"))
    return tmp_path


def test_run_trains_the_chain_then_skips_complete_links(ladder: Path):
    assert main(["-q", "run", str(ladder / "b3.toml")]) == 0
    b1, b2, b3 = (read_checkpoint(ladder / name / "checkpoint.pt")[0]
                  for name in ("b1", "b2", "b3"))
    assert (b1["step"], b2["step"], b3["step"]) == (3, 2, 0)
    # b3 trains 0 steps, so its weights are exactly those b2 ended with: the chain passed them on
    for key, value in b2["model"].items():
        assert torch.equal(b3["model"][key], value)
    assert b3["action"]["beta"] == 3.0
    before = {name: _digest(ladder / name / "checkpoint.pt") for name in ("b1", "b2")}
    assert main(["-q", "run", str(ladder / "b3.toml")]) == 0
    assert before == {name: _digest(ladder / name / "checkpoint.pt") for name in ("b1", "b2")}


def test_train_trains_missing_parents_and_starts_from_the_parent(ladder: Path):
    assert main(["-q", "train", str(ladder / "b2.toml"), "--steps", "0"]) == 0
    b1 = read_checkpoint(ladder / "b1" / "checkpoint.pt")[0]
    b2 = read_checkpoint(ladder / "b2" / "checkpoint.pt")[0]
    assert b1["step"] == 3
    for key, value in b1["model"].items():
        assert torch.equal(b2["model"][key], value)


def test_chain_is_resolved_root_first(ladder: Path):
    names = [r.name for r in recipe_chain(load_recipe(ladder / "b3.toml"))]
    assert names == ["b1", "b2"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_a_looping_chain_is_refused(tmp_path: Path, capsys):
    (tmp_path / "a.toml").write_text(_recipe(1.0, steps=1, init_from="b.toml"))
    (tmp_path / "b.toml").write_text(_recipe(2.0, steps=1, init_from="a.toml"))
    assert main(["run", str(tmp_path / "a.toml")]) == 2
    assert "loops" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.toml", "b.toml"]


def test_a_chain_that_changes_the_theory_is_refused(tmp_path: Path, capsys):
    (tmp_path / "phi.toml").write_text(_recipe(1.0, steps=1, theory="phi4", flow=""))
    (tmp_path / "u.toml").write_text(_recipe(2.0, steps=1, init_from="phi.toml"))
    assert main(["train", str(tmp_path / "u.toml")]) == 2
    assert "changes the theory" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi.toml", "u.toml"]


def test_a_chain_that_changes_the_architecture_is_refused(tmp_path: Path):
    (tmp_path / "a.toml").write_text(_recipe(1.0, steps=1))
    wide = FLOW.replace("hidden = [2]", "hidden = [3]")
    (tmp_path / "b.toml").write_text(_recipe(2.0, steps=1, init_from="a.toml", flow=wide))
    with pytest.raises(LatticeflowError, match="architecture"):
        recipe_chain(load_recipe(tmp_path / "b.toml"))


PHI4_FLOW = '[flow]\nbase = "fourier"\ntransform = "spline"\nn_couplings = 2\nhidden = [2]\n'


def test_a_link_may_add_coarse_levels_which_start_as_the_identity(tmp_path: Path):
    (tmp_path / "a.toml").write_text(_recipe(1.0, steps=3, theory="phi4", flow=PHI4_FLOW))
    grown = PHI4_FLOW + "coarse = [2]\ncoarse_couplings = 2\n"
    (tmp_path / "b.toml").write_text(_recipe(1.0, steps=0, theory="phi4", flow=grown,
                                             init_from="a.toml"))
    assert main(["-q", "run", str(tmp_path / "b.toml")]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    # the base and the two couplings moved past the coarse level, unchanged
    assert torch.equal(b["couplings.0.log_coefficients"], a["couplings.0.log_coefficients"])
    for i in (1, 2):
        for key in [k for k in a if k.startswith(f"couplings.{i}.")]:
            assert torch.equal(b[key.replace(f"couplings.{i}.", f"couplings.{i + 1}.")], a[key])
    last = [k for k in b if k.startswith("couplings.1.layers.1.net.") and k.endswith("weight")]
    assert all(b[k].abs().max() == 0 for k in last[-1:])  # fresh coarse coupling: zero output
    # dropping coarse levels, or adding them to a flow that has some, stays refused
    (tmp_path / "c.toml").write_text(_recipe(1.0, steps=0, theory="phi4", flow=PHI4_FLOW,
                                             init_from="b.toml"))
    more = grown.replace("coarse = [2]", "coarse = [2, 4]")
    (tmp_path / "d.toml").write_text(_recipe(1.0, steps=0, theory="phi4", flow=more,
                                             init_from="b.toml"))
    for name in ("c.toml", "d.toml"):
        with pytest.raises(LatticeflowError, match="architecture"):
            recipe_chain(load_recipe(tmp_path / name))


def test_init_from_must_name_an_existing_other_recipe(tmp_path: Path):
    (tmp_path / "a.toml").write_text(_recipe(1.0, steps=1, init_from="missing.toml"))
    with pytest.raises(LatticeflowError, match="init_from"):
        load_recipe(tmp_path / "a.toml")
    (tmp_path / "self.toml").write_text(_recipe(1.0, steps=1, init_from="self.toml"))
    with pytest.raises(LatticeflowError, match="itself"):
        load_recipe(tmp_path / "self.toml")


# ------------------------------------------------------------------------------ the floor
def _spoil(checkpoint: Path) -> None:
    """Add large noise to every weight of a checkpoint: a flow far worse than its prior."""
    state = torch.load(checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 3.0 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
                      for k, v in state["model"].items()}
    torch.save(state, checkpoint)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "checkpoint.pt")[0]["model"]


@pytest.mark.parametrize("floor", [True, False])
def test_the_floor_starts_fresh_from_a_parent_worse_than_the_prior(tmp_path: Path, floor: bool):
    """A parent spoiled far below the plaquette prior: with the floor the link starts from its
    own fresh start (the weights of the same recipe without init_from), without it from the
    spoiled weights."""
    flow = FLOW + 'prior = "plaquette"\n'
    (tmp_path / "parent.toml").write_text(_recipe(3.0, steps=0, flow=flow))
    (tmp_path / "alone.toml").write_text(_recipe(3.0, steps=0, flow=flow))
    child = _recipe(3.0, steps=0, init_from="parent.toml", flow=flow, floor=floor)
    (tmp_path / "child.toml").write_text(child.replace("ess_batch = 16", "ess_batch = 512"))
    assert main(["-q", "train", str(tmp_path / "parent.toml")]) == 0
    _spoil(tmp_path / "parent" / "checkpoint.pt")
    assert main(["-q", "train", str(tmp_path / "alone.toml")]) == 0
    assert main(["-q", "train", str(tmp_path / "child.toml")]) == 0
    child = _weights(tmp_path / "child")
    expected = _weights(tmp_path / ("alone" if floor else "parent"))
    assert all(torch.equal(child[k], v) for k, v in expected.items())
    state = read_checkpoint(tmp_path / "child" / "checkpoint.pt")[0]
    assert (state["ess"] > 0.5) == floor    # the prior's ESS at β = 3 on 4×4 is ≈ 0.9
    assert state["started_fresh"] == floor
    # the parent's training counts toward the child's lineage only when the child started from it
    parent = read_checkpoint(tmp_path / "parent" / "checkpoint.pt")[0]
    parent["wall_time"] = 100.0
    torch.save(parent, tmp_path / "parent" / "checkpoint.pt")
    own, lineage = lineage_training_seconds(load_recipe(tmp_path / "child.toml"), state)
    assert lineage == pytest.approx(own + (0.0 if floor else 100.0))


def test_the_floor_keeps_the_better_of_two_starts(tmp_path: Path):
    """Trainer.apply_init_floor against spoiled weights, both ways round: the plaquette-prior
    start (zero couplings, ESS ≈ 0.9 at β = 3 on 4×4) beats the spoiled one and is kept whether
    it is the inherited or the fresh one."""
    flow = FLOW + 'prior = "plaquette"\n'
    path = tmp_path / "r.toml"
    path.write_text(_recipe(3.0, steps=0, flow=flow).replace("ess_batch = 16", "ess_batch = 512"))
    trainer = Trainer(load_recipe(path), tmp_path / "r")
    prior = {k: v.clone() for k, v in trainer.flow.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    spoiled = {k: v + 3.0 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
               for k, v in prior.items()}
    assert trainer.apply_init_floor(spoiled)              # the inherited prior start stays
    assert all(torch.equal(v, prior[k]) for k, v in trainer.flow.state_dict().items())
    prior_ess = trainer.last_ess
    trainer.flow.load_state_dict(spoiled)
    assert not trainer.apply_init_floor(prior)            # the spoiled inherited one goes
    assert all(torch.equal(v, prior[k]) for k, v in trainer.flow.state_dict().items())
    assert trainer.last_ess == prior_ess > 0.5
