"""analysis/critical_slowing.py: the --quick run on tiny trained flows, bad input, the dynamic
exponent fit, the HMC chain-count choice and the ``reliable`` flag of the sampler race."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from latticeflow.cli import main as latticeflow_main
from latticeflow.studies import critical_slowing as cs
from latticeflow.studies.critical_slowing_report import fit_exponent
from latticeflow.studies.sampler_race import MIN_TAU_LENGTHS, estimate, is_reliable
from latticeflow.theories.phi4 import Phi4

_SPEC = importlib.util.spec_from_file_location(
    "critical_slowing_script", Path(__file__).parents[1] / "analysis" / "critical_slowing.py")
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)

TRAINING = "[training]\nsteps = 2\nbatch_size = 8\ness_batch = 16\n"


def _phi4(L: int, init_from: str | None = None) -> str:
    chain = f'init_from = "{init_from}"\n' if init_from else ""
    return (f'action = {{theory = "phi4", m2 = -4.0, lam = 6.0}}\nlattice = [{L}, {L}]\n'
            f'device = "cpu"\n{chain}[flow]\nn_couplings = 2\nhidden = [4]\n{TRAINING}')


def _u1(name: str | None = None) -> str:
    head = f'name = "{name}"\n' if name else ""
    return (f'{head}action = {{theory = "u1", beta = 2.0}}\nlattice = [4, 4]\ndevice = "cpu"\n'
            f"[flow]\nn_couplings = 2\nn_mixture = 2\nhidden = [2]\n{TRAINING}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    for L, parent in ((4, None), (8, "phi4_critical_L4.toml")):   # L = 8 starts from L = 4
        path = runs / f"phi4_critical_L{L}.toml"
        path.write_text(_phi4(L, parent))
        assert latticeflow_main(["-q", "train", str(path)]) == 0
    (runs / "phi4_critical_L6.toml").write_text(_phi4(6))               # never trained
    (runs / "phi4_critical_L12.toml").write_text(_u1())                 # the wrong theory
    # a φ⁴ recipe whose run directory holds a U(1) flow
    decoy = runs / "decoy.toml"
    decoy.write_text(_u1("phi4_critical_L16"))
    assert latticeflow_main(["-q", "train", str(decoy)]) == 0
    (runs / "phi4_critical_L16.toml").write_text(_phi4(16))
    heat_bath = runs / "hb_L4.toml"            # another family: even sites by heat bath
    heat_bath.write_text(_phi4(4).replace("[flow]\n", "[flow]\nheat_bath = true\n"))
    assert latticeflow_main(["-q", "train", str(heat_bath)]) == 0
    return runs


def _args(runs: Path, out: Path, *sizes: str) -> list[str]:
    return ["-q", "--quick", "--runs", str(runs), "--out", str(out), "--L", *sizes]


def test_quick_run_writes_table_json_and_figure(runs: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert script.main(_args(runs, out, "8", "4")) == 0
    data = json.loads((out / "critical_slowing.json").read_text())
    assert [p["L"] for p in data["points"]] == [4, 8]
    for point in data["points"]:
        tuning = point["hmc_tuning"]
        assert tuning["chains"] in (1, 4, 16) and len(tuning["scan"]) == 4
        assert {t["n_chains"] for t in tuning["throughput"]} == {1, 4, 16}
        best = min(tuning["scan"], key=lambda s: s["cost_abs_m_s"])
        assert tuning["trajectory_length"] == best["trajectory_length"]
    own = {p["L"]: p["training_s"] for p in data["points"]}
    assert own[4] > 0 and own[8] > 0
    assert data["points"][0]["training_chain_s"] == own[4]
    assert data["points"][1]["training_chain_s"] == pytest.approx(own[4] + own[8])
    for point in data["points"]:
        tuning = point["hmc_tuning"]
        assert point["reference"]["budget_s"] == pytest.approx(2.0)
        for name in ("hmc", "nmcmc"):
            r = point["results"][name]
            assert r["rows"] > 0 and r["wall_s"] >= 1.0 and 0 <= r["acceptance"] <= 1
            assert 0 < r["abs_m"]["value"] < 3 and r["m2"]["tau_int"] > 0
            assert r["cost_chi2_s"] == pytest.approx(
                r["wall_s"] * 2 * r["m2"]["tau_int"] / r["rows"])
        assert point["results"]["hmc"]["chains"] == tuning["chains"]
        hmc, nmcmc = (point["results"][s]["cost_chi2_s"] for s in ("hmc", "nmcmc"))
        n_star = point["break_even_independent_chi2"]
        assert n_star is None if hmc <= nmcmc else n_star == pytest.approx(
            point["training_chain_s"] / (hmc - nmcmc))
    assert data["fits"]["hmc"]["n"] == 2
    table = (out / "critical_slowing.md").read_text()
    assert "| 8 | nmcmc |" in table and "z = " in table
    assert (out / "critical_slowing.png").stat().st_size > 1000
    assert set(json.loads((out / script.CACHE).read_text())) == {"L4", "L8"}
    # outputs are never replaced without --force
    before = (out / "critical_slowing.md").read_bytes()
    assert script.main(_args(runs, out, "4")) == 2
    assert (out / "critical_slowing.md").read_bytes() == before


def test_recipe_family_by_name(runs: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert script.main(_args(runs, out, "4") + ["--recipe", "hb_L{L}.toml"]) == 0
    point = json.loads((out / "critical_slowing.json").read_text())["points"][0]
    assert point["L"] == 4 and 0 < point["results"]["nmcmc"]["acceptance"] <= 1
    assert point["recipe"].endswith("hb_L4.toml")
    assert script.main(_args(runs, tmp_path / "other", "4") + ["--recipe", "hb.toml"]) == 2
    assert "no {L}" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(("sizes", "message"), [
    (["4", "10"], "no recipe"),                # an L with no recipe or card
    (["4", "6"], "no trained flow"),           # a missing checkpoint
    (["12"], "needs φ⁴"),                      # a recipe of the wrong theory
    (["16"], "trained for the u1 action"),     # a checkpoint of the wrong theory
])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(runs, tmp_path, capsys, sizes,
                                                             message):
    out = tmp_path / "out"
    out.mkdir()
    cache = out / script.CACHE
    cache.write_text("{}\n")
    assert script.main(_args(runs, out, *sizes)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [script.CACHE]
    assert cache.read_text() == "{}\n"


def test_cached_reference_is_reused_only_when_it_fits():
    settings = cs.SlowingSettings(budget_s=1.0, reference_factor=2.0)
    action = Phi4(-4.0, 6.0)
    entry = {"action": action.params(), "budget_s": 2.0, "abs_m": 0.1, "abs_m_error": 0.01,
             "chi2": 1.0, "chi2_error": 0.1}
    cache = {"L4": entry}
    assert cs.reference(action, 4, None, settings, cache) is entry   # tuning unused: no run
    longer = cs.SlowingSettings(budget_s=3.0, reference_factor=2.0)
    with pytest.raises(AttributeError):   # would run (and needs a tuning)
        cs.reference(action, 4, None, longer, cache)
    with pytest.raises(AttributeError):
        cs.reference(Phi4(-4.0, 5.0), 4, None, settings, cache)


def test_fit_recovers_a_known_dynamic_exponent():
    sizes = np.array([8, 16, 32, 64])
    exact = 0.7 * sizes**2.1
    fit = fit_exponent(sizes, exact, 0.05 * exact)
    assert fit.z == pytest.approx(2.1) and fit.amplitude == pytest.approx(0.7)
    assert fit.z_error == pytest.approx(0.05 / np.std(np.log(sizes)) / 2, rel=1e-6)
    rng = np.random.default_rng(1)
    noisy = exact * (1 + 0.05 * rng.standard_normal(4))
    fit = fit_exponent(sizes, noisy, 0.05 * noisy)
    assert abs(fit.z - 2.1) < 3 * fit.z_error and fit.z_error < 0.1
    assert fit_exponent([8], [3.0], [0.1]) is None


def test_chain_count_keeps_chains_50_tau_long():
    throughput = [{"n_chains": c, "configs_per_s": s} for c, s in ((1, 100.0), (4, 350.0),
                                                                  (16, 1000.0), (64, 1200.0))]
    # at 64 chains each chain gets 1200/64 ≈ 19 trajectories/s
    assert cs._enough_per_chain(throughput, 64, 1200 / 64, 1.0, 10.0)[0] == 64
    # τ_int = 10: a chain needs 500 trajectories; in 10 s only 16 chains (62.5/s each) or fewer
    chains, reason = cs._enough_per_chain(throughput, 64, 1200 / 64, 10.0, 10.0)
    assert chains == 16 and "50" in reason
    assert cs._enough_per_chain(throughput, 64, 1200 / 64, 1000.0, 10.0)[0] == 1


def _ar1(rng: np.random.Generator, rho: float, rows: int, chains: int) -> np.ndarray:
    x = np.empty((rows, chains))
    x[0] = rng.standard_normal(chains)
    for t in range(1, rows):
        x[t] = rho * x[t - 1] + np.sqrt(1 - rho**2) * rng.standard_normal(chains)
    return x


def test_reliable_needs_every_chain_50_tau_long():
    assert is_reliable(False, 2.0, int(MIN_TAU_LENGTHS * 2))
    assert not is_reliable(False, 2.0, int(MIN_TAU_LENGTHS * 2) - 1)
    assert not is_reliable(True, 2.0, 10_000)
    rng = np.random.default_rng(0)   # τ_int = (1 + ρ)/(2(1 − ρ)) = 9.5
    long = estimate(_ar1(rng, 0.9, 20_000, 1))
    assert long.reliable and long.tau_int == pytest.approx(9.5, rel=0.3)
    many_short = estimate(_ar1(rng, 0.9, 200, 64))   # N = 12800 > 50 τ, but 200 < 50 τ per chain
    assert many_short.n == 12_800 and many_short.rows_per_chain == 200
    assert not many_short.reliable
    frozen = estimate(np.ones((300, 2)))
    assert not frozen.reliable and frozen.tau_int == 300
