"""analysis/freezing.py: the --quick smoke run on tiny trained flows, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from latticeflow.cli import main as latticeflow_main
from latticeflow.studies.freezing import measure

_SPEC = importlib.util.spec_from_file_location(
    "freezing_script", Path(__file__).parents[1] / "analysis" / "freezing.py")
freezing_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(freezing_script)


def _recipe(beta: float, theory: str = "u1") -> str:
    action = (f'{{theory = "u1", beta = {beta}}}' if theory == "u1"
              else '{theory = "phi4", m2 = -4.0, lam = 8.0}')
    flow = "[flow]\nn_couplings = 2\nn_mixture = 2\nhidden = [2]\n" if theory == "u1" else ""
    return (f'action = {action}\nlattice = [4, 4]\ndevice = "cpu"\n{flow}'
            f"[training]\nsteps = 2\nbatch_size = 8\ness_batch = 16\n")


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    for beta in (2, 3):
        path = runs / f"u1_beta{beta}_L4.toml"
        path.write_text(_recipe(beta))
        assert latticeflow_main(["-q", "train", str(path)]) == 0
    (runs / "u1_beta5_L4.toml").write_text(_recipe(5))          # never trained
    (runs / "u1_beta7_L4.toml").write_text(_recipe(7, "phi4"))  # the wrong theory
    return runs


def _args(runs: Path, out: Path, *betas: str) -> list[str]:
    return ["-q", "--quick", "--runs", str(runs), "--lattice", "4", "--out", str(out),
            "--betas", *betas]


def test_quick_run_writes_table_json_and_figure(ladder: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert freezing_script.main(_args(ladder, out, "2", "3")) == 0
    rows = json.loads((out / "freezing.json").read_text())["rows"]
    assert {(r["beta"], r["sampler"]) for r in rows} == {(b, s) for b in (2.0, 3.0)
                                                         for s in ("hmc", "nmcmc")}
    for r in rows:
        assert r["rows"] > 0 and r["wall_s"] >= 2.0 and 0 <= r["acceptance"] <= 1
        assert r["chi_t_exact"] > 0
    assert "| 3 | nmcmc |" in (out / "freezing.md").read_text()
    assert (out / "freezing.png").stat().st_size > 1000
    # outputs are never replaced without --force
    before = (out / "freezing.md").read_bytes()
    assert freezing_script.main(_args(ladder, out, "2")) == 2
    assert (out / "freezing.md").read_bytes() == before


@pytest.mark.parametrize(("betas", "message"), [
    (["2", "4"], "no recipe"),            # a β with no recipe or card
    (["2", "5"], "no trained flow"),      # a missing checkpoint
    (["7"], "needs U(1)"),                # a recipe of the wrong theory
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(ladder, tmp_path, capsys, betas,
                                                            message):
    out = tmp_path / "out"
    assert freezing_script.main(_args(ladder, out, *betas)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_cost_per_independent_sample_and_frozen_chains():
    import numpy as np

    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, size=(4000, 1)).astype(float)   # independent draws: τ_int ≈ 1/2
    r = measure("nmcmc", 2.0, (8, 8), q, wall_s=10.0, setup_s=0.0, acceptance=1.0)
    assert abs(r.tau_int - 0.5) < 0.1 and r.reliable
    assert r.cost_per_independent_s == pytest.approx(10.0 * 2 * r.tau_int / 4000)
    frozen = measure("hmc", 6.0, (8, 8), np.ones((500, 2)), wall_s=5.0, setup_s=0.0,
                     acceptance=0.9)
    assert not frozen.reliable and frozen.tau_int == 500   # unknown: reported as a bound
