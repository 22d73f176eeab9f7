"""analysis/freezing.py: the --quick smoke run on tiny trained flows (rows (a)–(e)), the exact
sampler's row against exact χ_t, the break-even formula, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from latticeflow.cli import main as latticeflow_main
from latticeflow.studies import freezing
from latticeflow.studies.freezing import measure
from latticeflow.studies.sampler_race import break_even

_SPEC = importlib.util.spec_from_file_location(
    "freezing_script", Path(__file__).parents[1] / "analysis" / "freezing.py")
freezing_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(freezing_script)


def _recipe(beta: float, theory: str = "u1", prior: str | None = None) -> str:
    action = (f'{{theory = "u1", beta = {beta}}}' if theory == "u1"
              else '{theory = "phi4", m2 = -4.0, lam = 8.0}')
    flow = "[flow]\nn_couplings = 2\nn_mixture = 2\nhidden = [2]\n" if theory == "u1" else ""
    if prior is not None:
        flow += f'prior = "{prior}"\n'
    return (f'action = {action}\nlattice = [4, 4]\ndevice = "cpu"\n{flow}'
            f"[training]\nsteps = 2\nbatch_size = 8\ness_batch = 16\n")


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    for beta in (2, 3, 6, 9):
        path = runs / f"u1_flow_beta{beta}_L4.toml"
        path.write_text(_recipe(beta))
        assert latticeflow_main(["-q", "train", str(path)]) == 0
    (runs / "u1_flow_beta5_L4.toml").write_text(_recipe(5))          # never trained
    (runs / "u1_flow_beta7_L4.toml").write_text(_recipe(7, "phi4"))  # the wrong theory
    haar = runs / "u1_haar_beta2_L4.toml"                         # row (e) at β = 2 only
    haar.write_text(_recipe(2, prior="uniform"))
    assert latticeflow_main(["-q", "train", str(haar)]) == 0
    (runs / "u1_haar_beta6_L4.toml").write_text(_recipe(6, prior="uniform"))    # never trained
    (runs / "u1_haar_beta9_L4.toml").write_text(_recipe(9, prior="plaquette"))  # not Haar
    return runs


def _args(runs: Path, out: Path, *betas: str) -> list[str]:
    return ["-q", "--quick", "--runs", str(runs), "--lattice", "4", "--out", str(out),
            "--betas", *betas]


@pytest.fixture(scope="module")
def quick(ladder: Path, tmp_path_factory) -> Path:
    """One --quick run at β = 2 (with a Haar-prior recipe) and β = 3 (without); its --out."""
    out = tmp_path_factory.mktemp("quick") / "out"
    assert freezing_script.main(_args(ladder, out, "2", "3")) == 0
    return out


def test_quick_run_writes_table_json_and_figure(ladder: Path, quick: Path):
    out = quick
    rows = json.loads((out / "freezing.json").read_text())["rows"]
    # rows (a)–(d) at every β, (e) only where a Haar-prior recipe exists (β = 2)
    assert {(r["beta"], r["sampler"]) for r in rows} == {
        (b, s) for b in (2.0, 3.0) for s in ("hmc", "exact", "prior", "nmcmc")} | {(2.0, "haar")}
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
    (["2", "6"], "u1_haar_beta6_L4.toml: no trained flow"),   # a Haar recipe, untrained
    (["9"], "this row needs 'uniform'"),  # a "Haar" recipe with the plaquette prior
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(ladder, tmp_path, capsys, betas,
                                                            message):
    out = tmp_path / "out"
    assert freezing_script.main(_args(ladder, out, *betas)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_cost_per_independent_sample_and_frozen_chains():
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, size=(4000, 1)).astype(float)   # independent draws: τ_int ≈ 1/2
    r = measure("nmcmc", 2.0, (8, 8), q, wall_s=10.0, setup_s=0.0, acceptance=1.0)
    assert abs(r.tau_int - 0.5) < 0.1 and r.reliable
    assert r.cost_per_independent_s == pytest.approx(10.0 * 2 * r.tau_int / 4000)
    frozen = measure("hmc", 6.0, (8, 8), np.ones((500, 2)), wall_s=5.0, setup_s=0.0,
                     acceptance=0.9)
    assert not frozen.reliable and frozen.tau_int == 500   # unknown: reported as a bound


def test_quick_run_columns_tuning_and_notes(quick: Path):
    out = quick
    data = json.loads((out / "freezing.json").read_text())
    rows = {(r["beta"], r["sampler"]): r for r in data["rows"]}
    for (beta, name), r in rows.items():
        hmc = rows[(beta, "hmc")]
        assert r["cost_per_independent_s"] == pytest.approx(
            r["wall_s"] * 2 * r["tau_int"] / r["rows"])
        if name in ("nmcmc", "haar"):   # trained: own = lineage (no init_from)
            assert r["training_s"] > 0 and r["training_chain_s"] == r["training_s"]
        else:                           # (a), (b), (c) need no training
            assert r["training_s"] == 0 and r["training_total_s"] == 0
        if name == "hmc":
            assert r["break_even_independent_q2"] is None and r["speedup_vs_hmc"] is None
            continue
        gain = hmc["cost_per_independent_s"] - r["cost_per_independent_s"]
        expected = r["training_total_s"] / gain if gain > 0 else None
        assert r["break_even_independent_q2"] == (
            pytest.approx(expected) if expected is not None else None)
    assert rows[(2.0, "exact")]["chains"] == 1
    for point in data["points"]:
        tuning = point["hmc_tuning"]
        assert tuning["chains"] in (1, 4, 16) and len(tuning["scan"]) == 2
        assert {t["n_chains"] for t in tuning["throughput"]} == {1, 4, 16}
        best = min(tuning["scan"], key=lambda s: s["cost_q2_s"])
        assert tuning["trajectory_length"] == best["trajectory_length"]
        assert rows[(point["beta"], "hmc")]["chains"] == tuning["chains"]
    assert data["points"][0]["notes"] == []
    assert "row (e) left out" in data["points"][1]["notes"][0]
    table = (out / "freezing.md").read_text()
    assert "| 2 | haar | (e) Haar-prior flow |" in table and "| 3 | haar |" not in table
    for label in ("(a) tuned HMC", "(b) exact sampler", "(c) plaquette prior",
                  "(d) plaquette-prior flow"):
        assert label in table
    assert "u1_haar_beta3_L4.toml; row (e) left out" in table
    with np.load(out / "charges.npz") as charges:
        assert set(charges.files) == {f"{k[1]}_beta{k[0]:g}" for k in rows}


def test_exact_sampler_row_agrees_with_exact_chi_t():
    point = freezing.LadderInput(2.0, (4, 4), {})
    settings = freezing.FreezingSettings(budget_s=0.5, batch=512, seed=3)
    q, wall, setup, acceptance = freezing.draw_exact(point, settings)
    r = measure("exact", 2.0, (4, 4), q, wall, setup, acceptance)
    assert r.rows >= 512 and r.chains == 1 and 0 < r.acceptance < 1
    assert abs(r.pull) < 4, (r.chi_t, r.chi_t_error, r.chi_t_exact)
    assert abs(r.tau_int - 0.5) < 0.1 and r.reliable       # independent draws, but measured


def test_a_flow_without_couplings_is_its_prior():
    """Row (c)'s proposal: Flow(prior, []) samples the prior in the dtype ``.to()`` gave it."""
    import torch

    from latticeflow.flows.flow import Flow
    from latticeflow.flows.plaquette_prior import PlaquettePrior

    prior = PlaquettePrior((4, 4), 2.0)
    flow = Flow(prior, []).to(torch.float64)
    x, log_q = flow.sample(8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 2, 4, 4) and x.dtype == flow.dtype == torch.float64
    assert list(flow.parameters()) == [] and "anchor" not in flow.state_dict()
    torch.testing.assert_close(log_q, prior.log_prob(x))


def test_break_even_is_training_over_the_cost_gap():
    assert break_even(100.0, 0.01, 0.002) == pytest.approx(100.0 / 0.008)
    assert break_even(0.0, 0.01, 0.002) == 0.0           # no training: pays at once
    assert break_even(100.0, 0.002, 0.01) == float("inf")  # never cheaper: never pays
    assert break_even(100.0, 0.01, 0.01) == float("inf")

    def row(name: str, cost: float, own: float, chain: float | None) -> freezing.SamplerResult:
        return freezing.SamplerResult(name, 4.0, 100, 1, 1.0, 0.0, 1.0, 0.1, 0.01, 0.1, 1.0,
                                      0.1, cost, True, own, chain)

    point = freezing.BetaPoint(4.0, "r.toml", {
        "hmc": row("hmc", 0.05, 0.0, 0.0), "nmcmc": row("nmcmc", 0.01, 30.0, 120.0),
        "haar": row("haar", 0.03, 40.0, None)}, {})
    assert point.break_even("nmcmc") == pytest.approx(120.0 / 0.04)   # the whole lineage
    assert point.break_even("haar") == pytest.approx(40.0 / 0.02)     # lineage unknown: own
