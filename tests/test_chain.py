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
from latticeflow.training import read_checkpoint
from latticeflow.training.lineage import recipe_lineage as recipe_chain

FLOW = "[flow]\nn_couplings = 2\nn_mixture = 2\nhidden = [2]\n"


def _recipe(beta: float, *, steps: int, init_from: str | None = None, theory: str = "u1",
            lattice: str = "[4, 4]", flow: str = FLOW) -> str:
    action = (f'action = {{theory = "u1", beta = {beta}}}' if theory == "u1"
              else 'action = {theory = "phi4", m2 = -4.0, lam = 8.0}')
    chain = "" if init_from is None else f'init_from = "{init_from}"\n'
    return (f"{action}\nlattice = {lattice}\ndtype = \"float64\"\ndevice = \"cpu\"\n{chain}"
            f"{flow}[training]\nsteps = {steps}\nbatch_size = 8\ness_batch = 16\n"
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


def test_init_from_must_name_an_existing_other_recipe(tmp_path: Path):
    (tmp_path / "a.toml").write_text(_recipe(1.0, steps=1, init_from="missing.toml"))
    with pytest.raises(LatticeflowError, match="init_from"):
        load_recipe(tmp_path / "a.toml")
    (tmp_path / "self.toml").write_text(_recipe(1.0, steps=1, init_from="self.toml"))
    with pytest.raises(LatticeflowError, match="itself"):
        load_recipe(tmp_path / "self.toml")
