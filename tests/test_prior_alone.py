"""The U(1) default sampler: the plaquette prior alone (``[flow] n_couplings = 0``), nothing
trained. The recipe runs end to end (train writes a 0-step checkpoint, sample, analyse) and
reproduces the exact plaquette and ⟨Q²⟩; training it, or a uniform prior alone, is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latticeflow import exact
from latticeflow.base.errors import ConfigError
from latticeflow.cli import main
from latticeflow.config import load_recipe

PRIOR_ALONE = """action = {{theory = "u1", beta = {beta}}}
lattice = [4, 4]
seed = 3
[flow]
n_couplings = 0
prior = "{prior}"
[training]
steps = {steps}
[sampling]
n = 6000
batch_size = 1000
chunk = 2000
[analysis]
thermalization = 100
"""


def _recipe(tmp_path: Path, beta: float = 2.0, prior: str = "plaquette", steps: int = 0) -> Path:
    path = tmp_path / "prior.toml"
    path.write_text(PRIOR_ALONE.format(beta=beta, prior=prior, steps=steps))
    return path


def test_the_prior_alone_reproduces_the_exact_plaquette_and_charge(tmp_path: Path):
    """β = 2 on 4×4, 5900 rows: ⟨cos P⟩ and ⟨Q²⟩ within 4 Γ-method errors of the exact values
    (the prior's acceptance is ≈ 0.74, so τ_int ≈ 1 and the errors are ≈ 0.003 and 0.01)."""
    assert main(["-q", "run", str(_recipe(tmp_path))]) == 0
    run = tmp_path / "prior"
    observables = json.loads((run / "analysis" / "observables.json").read_text())["observables"]
    for name, expected in (("plaquette", exact.u1_mean_plaquette(2.0, (4, 4))),
                           ("topological_charge_squared",
                            exact.u1_mean_q2(2.0, (4, 4)))):
        value, error = observables[name]["value"], observables[name]["error"]
        assert 0 < error < 0.02 and abs(value - expected) < 4 * error, (name, value, expected)


def test_training_the_prior_alone_is_refused(tmp_path: Path, capsys):
    path = _recipe(tmp_path, steps=10)
    with pytest.raises(ConfigError, match="nothing to train"):
        load_recipe(path)
    assert main(["train", str(_recipe(tmp_path)), "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to train" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.toml"]


def test_a_uniform_prior_alone_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="n_couplings"):
        load_recipe(_recipe(tmp_path, prior="uniform"))
