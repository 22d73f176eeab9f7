"""Ensemble analysis (latticeflow.measure, plots, script_support and analysis/*.py) on ensembles
drawn from exactly known distributions: iid free-field samples (Cholesky of the exact
covariance), uniform U(1) links (β = 0), constructed AR(1) chains, and a short real HMC run."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pytest
import torch

from latticeflow import exact, observables
from latticeflow import measure as analysis
from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import EnsembleWriter, read_ensemble
from latticeflow.lattice import plaquette
from latticeflow.measure import plots
from latticeflow.samplers.chain import run_chain
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.theories import Phi4, Phi4Hopping, U1Wilson
from latticeflow.training import METRIC_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("observables", "autocorrelation", "compare")
OBSERVABLE_KEYS = {"value", "error", "tau_int", "tau_int_error"}


# --------------------------------------------------------------------------------------------
# Ensembles from known distributions
# --------------------------------------------------------------------------------------------


def free_field_samples(shape: tuple[int, ...], m2: float, n: int, seed: int) -> np.ndarray:
    """n iid samples of the free field (standard form, λ = 0): φ = L z, L Lᵀ = G (exact)."""
    g = exact.free_two_point(shape, m2)
    volume = math.prod(shape)
    coords = np.array(np.unravel_index(np.arange(volume), shape)).T
    lag = (coords[:, None, :] - coords[None, :, :]) % np.array(shape)
    covariance = g[tuple(lag.reshape(-1, len(shape)).T)].reshape(volume, volume)
    chol = np.linalg.cholesky(covariance)
    z = np.random.default_rng(seed).standard_normal((n, volume))
    return (z @ chol.T).reshape(n, *shape)


def write_ensemble(path: Path, action, lattice: tuple[int, ...], configs: np.ndarray,
                   sampler: str = "hmc", chain: np.ndarray | None = None,
                   action_values: np.ndarray | None = None, seed: int = 0,
                   dtype=np.float64) -> Path:
    """Write ``configs`` as a schema-v1 ensemble (all rows accepted except every third)."""
    n = len(configs)
    s = action(torch.from_numpy(configs)).numpy() if action_values is None else action_values
    rows = {"configs": configs, "action": s, "accepted": np.arange(n) % 3 != 0}
    if sampler == "hmc":
        rows["delta_H"] = np.zeros(n)
    else:
        rows["log_q"] = np.zeros(n)
        rows["log_weight"] = -s
    if chain is not None:
        rows["chain"] = chain
    with EnsembleWriter.create(path, theory=action.theory, action_card=action.card(),
                               lattice=lattice, field_shape=action.field_shape(lattice),
                               sampler=sampler, seed=seed, sampler_params={},
                               chains=chain is not None, dtype=dtype) as writer:
        writer.append(rows, {"state": np.zeros(1)})
    return path


@pytest.fixture(scope="module")
def free_file(tmp_path_factory) -> Path:
    """Free field m² = 0.5 on a non-square 6×4 lattice, 4000 iid samples, one chain."""
    path = tmp_path_factory.mktemp("free") / "free.h5"
    lattice = (6, 4)
    return write_ensemble(path, Phi4(0.5, 0.0), lattice,
                          free_field_samples(lattice, 0.5, 4000, seed=1))


@pytest.fixture(scope="module")
def free_result(free_file: Path) -> analysis.AnalysisResult:
    return analysis.analyse(free_file)


@pytest.fixture(scope="module")
def u1_file(tmp_path_factory) -> Path:
    """β = 0: uniform links on 4×6, 3000 rows in 2 interleaved chains, stored as float32."""
    path = tmp_path_factory.mktemp("u1") / "u1.h5"
    links = np.random.default_rng(2).uniform(0.0, 2 * np.pi, (3000, 2, 4, 6))
    return write_ensemble(path, U1Wilson(0.0), (4, 6), links, sampler="nmcmc",
                          chain=np.arange(3000) % 2, dtype=np.float32)


def within(value: float, error: float, reference: float, sigmas: float = 4.0) -> bool:
    return abs(value - reference) <= sigmas * error


# --------------------------------------------------------------------------------------------
# φ⁴: observables, errors, correlators against the exact free field
# --------------------------------------------------------------------------------------------


def test_free_field_observables_match_exact(free_result):
    reference = free_result.exact.scalars
    assert set(free_result.observables) == set(analysis.PHI4_OBSERVABLES)
    assert set(reference) == set(analysis.PHI4_OBSERVABLES)
    assert reference["chi2"] == pytest.approx(1.0)            # 1/(2 m²)
    for name, o in free_result.observables.items():
        assert within(o.value, o.error, reference[name]), (name, o.value, o.error)
        assert o.tau_int == pytest.approx(0.5, abs=0.1), name  # iid samples
        assert o.error > 0
    assert free_result.n == 4000 and free_result.sampler == "hmc"
    assert free_result.acceptance == pytest.approx(np.mean(np.arange(4000) % 3 != 0))


def test_observables_equal_their_definitions(free_result, free_file, u1_file):
    """Values are exactly the defined functions of the stored rows (no statistics involved)."""
    data = read_ensemble(free_file)
    m = data["configs"].mean(axis=(1, 2))
    expected = {"abs_magnetization": np.mean(abs(m)), "magnetization_squared": np.mean(m**2),
                "chi2": 24 * (np.mean(m**2) - np.mean(m) ** 2),
                "binder": 1 - np.mean(m**4) / (3 * np.mean(m**2) ** 2),
                "action_density": np.mean(data["action"]) / 24}
    for name, value in expected.items():
        assert free_result.observables[name].value == pytest.approx(value, rel=1e-12), name
    links = torch.from_numpy(read_ensemble(u1_file)["configs"].astype(np.float64))
    q = torch.round(observables.topological_charge(links)).numpy()
    u1 = analysis.analyse(u1_file, correlators=False)
    assert u1.observables["topological_charge_squared"].value == pytest.approx(np.mean(q**2))
    assert u1.observables["plaquette"].value == pytest.approx(
        observables.plaquette_mean(links).mean().item(), rel=1e-12, abs=1e-15)
    assert u1.observables["wilson_loop_2x2"].value == pytest.approx(
        observables.wilson_loop(links, 2, 2).mean().item(), rel=1e-12, abs=1e-15)


def test_free_field_errors_are_calibrated(free_result):
    """Reported errors equal the exact standard deviations of the estimators (iid data):
    m ~ N(0, σ²) with σ² = χ₂/V, so sd(m²) = √2 σ², sd(|m|) = σ √(1 − 2/π), sd(S/V) = 1/√(2V)."""
    volume, n = 24, free_result.n
    sigma2 = 1.0 / volume
    expected = {"magnetization_squared": math.sqrt(2) * sigma2,
                "abs_magnetization": math.sqrt(sigma2 * (1 - 2 / math.pi)),
                "action_density": 1 / math.sqrt(2 * volume),
                "chi2": math.sqrt(2) * sigma2 * volume}
    for name, sd in expected.items():
        assert free_result.observables[name].error == pytest.approx(sd / math.sqrt(n),
                                                                    rel=0.12), name


def test_free_field_correlators_match_exact(free_result, free_file):
    corr, ref = free_result.correlators, free_result.exact
    assert corr.g.shape == (6, 4) and corr.c.shape == (6,) and corr.m_eff.shape == (4,)
    assert np.all(np.abs(corr.g - ref.g) <= 4.5 * corr.g_error)
    assert np.all(np.abs(corr.c - ref.c) <= 4.5 * corr.c_error)
    assert np.all(np.abs(corr.m_eff[:2] - ref.m_eff) <= 4.5 * corr.m_eff_error[:2])
    assert within(corr.xi2.value, corr.xi2.error, ref.xi2)
    assert ref.xi2 == pytest.approx(1 / math.sqrt(0.5))
    # jackknife error of G_c(0) against the naive error of the per-config <φ²> (iid data)
    phi = read_ensemble(free_file)["configs"]
    naive = (phi**2).mean(axis=(1, 2)).std(ddof=1) / math.sqrt(len(phi))
    assert corr.g_error[0, 0] == pytest.approx(naive, rel=0.3)
    # correlators reproduce the observables module on the whole batch
    g_batch = observables.connected_correlator(torch.from_numpy(phi)).numpy()
    assert np.abs(corr.g - g_batch).max() < 0.2 * corr.g_error.min()


def test_hopping_form_exact_reference_matches_samples(tmp_path):
    """λ = 0 hopping form: ϕ = φ/√κ with m² = 1/κ − 2d; the mapped exact values must describe
    samples of ϕ."""
    kappa, lattice = 0.2, (4, 4)
    m2 = 1 / kappa - 4
    phi = free_field_samples(lattice, m2, 3000, seed=3) / math.sqrt(kappa)
    action = Phi4Hopping(kappa, 0.0)
    result = analysis.analyse(write_ensemble(tmp_path / "hop.h5", action, lattice, phi))
    reference = result.exact.scalars
    assert reference["chi2"] == pytest.approx(1 / (2 * m2 * kappa))
    for name, o in result.observables.items():
        assert within(o.value, o.error, reference[name]), name
    # action stored by the hopping action equals the standard action on φ
    s_std = Phi4(m2, 0.0)(torch.from_numpy(phi * math.sqrt(kappa))).numpy()
    np.testing.assert_allclose(read_ensemble(tmp_path / "hop.h5")["action"], s_std, rtol=1e-10)


def test_exact_reference_availability():
    assert analysis.exact_reference("phi4", Phi4(-4.0, 8.0).card(), (8, 8)).scalars == {}
    assert analysis.exact_reference("phi4", Phi4(-1.0, 0.0).card(), (8, 8)).scalars == {}
    assert analysis.exact_reference("phi4", Phi4Hopping(0.3, 0.0).card(), (4, 4)).scalars == {}
    u1 = analysis.exact_reference("u1", U1Wilson(2.0).card(), (8, 8))
    assert u1.scalars["plaquette"] == pytest.approx(exact.u1_mean_plaquette(2.0, (8, 8)))
    assert u1.scalars["wilson_loop_2x2"] == pytest.approx(exact.u1_wilson_loop(2.0, (8, 8), 2, 2))
    assert u1.wilson.shape == (4, 4) and u1.creutz.shape == (4, 4)
    assert u1.creutz[0, 0] == pytest.approx(-math.log(u1.scalars["plaquette"]))


# --------------------------------------------------------------------------------------------
# U(1)
# --------------------------------------------------------------------------------------------


def test_u1_uniform_links_match_exact(u1_file):
    result = analysis.analyse(u1_file)
    reference = result.exact.scalars
    assert set(result.observables) == set(analysis.U1_OBSERVABLES) == set(reference)
    assert reference["plaquette"] == 0.0
    assert reference["topological_charge_squared"] == pytest.approx(
        exact.u1_mean_q2(0.0, (4, 6)))
    for name, o in result.observables.items():
        assert within(o.value, o.error, reference[name]), (name, o.value, o.error)
    q2, chi_t = (result.observables[n] for n in ("topological_charge_squared",
                                                 "topological_susceptibility"))
    assert chi_t.value == pytest.approx(q2.value / 24) and chi_t.error == pytest.approx(
        q2.error / 24)
    assert result.observables["wilson_loop_1x1"].value == pytest.approx(
        result.observables["plaquette"].value, abs=1e-12)
    topology = result.topology
    assert topology.max_non_integrality < 1e-9
    assert topology.counts.sum() == 3000 and np.all(np.diff(topology.charges) > 0)
    assert all(h.dtype.kind == "i" for h in topology.histories)
    wilson = result.wilson
    assert wilson.w.shape == (2, 3)
    assert np.all(np.abs(wilson.w) <= 4.5 * wilson.w_error)
    assert wilson.w[0, 0] == pytest.approx(result.observables["plaquette"].value, abs=0.01)


def test_wilson_loops_equal_observables_module():
    links = torch.rand(3, 2, 6, 8) * 2 * math.pi + 5.0
    fast = analysis.wilson_loops(links, 3, 4)
    slow = observables.wilson_loop_table(links, 3, 4)[:, 1:, 1:]
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    # every R ≤ L0, T ≤ L1 (the FFT lags wrap around): cos of the enclosed plaquette sum
    links = torch.rand(2, 2, 5, 4) * 2 * math.pi
    p = plaquette(links)
    table = analysis.wilson_loops(links, 5, 4)
    for r in range(1, 6):
        for t in range(1, 5):
            box = sum(torch.roll(p, (-k, -j), (1, 2)) for k in range(r) for j in range(t))
            torch.testing.assert_close(table[:, r - 1, t - 1], torch.cos(box).mean((1, 2)),
                                       rtol=0, atol=1e-12)


def test_u1_hmc_chains_match_exact(tmp_path):
    """A real, autocorrelated HMC ensemble (4 interleaved chains) against the exact torus."""
    config = HMCConfig(step_size=0.2, n_chains=4, n_therm=30)
    sampler = HMCSampler(U1Wilson(1.0), (4, 4), config, seed=11)
    path = tmp_path / "hmc.h5"
    with EnsembleWriter.create(path, **sampler.header(), chunk_rows=400) as writer:
        run_chain(sampler, writer, 2400, 400, progress=False)
    result = analysis.analyse(path, thermalization=10)
    assert result.n_chains == 4 and result.n == 4 * 590
    for name in ("plaquette", "wilson_loop_2x2", "topological_charge_squared"):
        o = result.observables[name]
        assert within(o.value, o.error, result.exact.scalars[name]), (name, o.value, o.error)
    assert result.diagnostics["exp_minus_delta_H"].value == pytest.approx(1.0, abs=0.05)
    assert np.all(np.abs(result.wilson.w - result.exact.wilson) <= 4.5 * result.wilson.w_error)


# --------------------------------------------------------------------------------------------
# Chains as replicas, thermalization, chunked reading
# --------------------------------------------------------------------------------------------


def ar1_chains(n_chains: int, length: int, rho: float, seed: int) -> np.ndarray:
    """(n_chains, length) AR(1) series with unit stationary variance."""
    rng = np.random.default_rng(seed)
    x = np.empty((n_chains, length))
    x[:, 0] = rng.standard_normal(n_chains)
    noise = rng.standard_normal((n_chains, length)) * math.sqrt(1 - rho**2)
    for t in range(1, length):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x


def constant_fields(values: np.ndarray, lattice: tuple[int, int]) -> np.ndarray:
    return np.broadcast_to(values[:, None, None], (len(values), *lattice)).copy()


def test_interleaved_chains_are_separated(tmp_path):
    """Rows of 4 AR(1) chains written round-robin: the analysis must follow /chain, recovering
    every chain in Markov order and the chain's τ_int (ignoring /chain would give ~1/2)."""
    rho, n_chains, length = 0.8, 4, 1500
    series = ar1_chains(n_chains, length, rho, seed=4)
    interleaved = series.T.reshape(-1)                  # row i belongs to chain i % 4
    chain = np.arange(interleaved.size) % n_chains
    path = write_ensemble(tmp_path / "ar1.h5", Phi4(1.0, 0.0), (2, 2),
                          constant_fields(interleaved, (2, 2)), chain=chain)
    result = analysis.analyse(path, correlators=False)
    for c in range(n_chains):
        np.testing.assert_allclose(result.histories["m"][c], series[c])
    m2 = result.observables["magnetization_squared"]
    exact_tau = (1 + rho**2) / (2 * (1 - rho**2))      # m² of a Gaussian AR(1): ρ → ρ²
    assert within(m2.tau_int, m2.tau_int_error, exact_tau)
    assert m2.value == pytest.approx(np.mean(interleaved**2))


def test_chains_as_replicas_agree_with_concatenation_for_iid(tmp_path):
    lattice = (4, 4)
    phi = free_field_samples(lattice, 1.0, 2000, seed=5)
    one = analysis.analyse(write_ensemble(tmp_path / "one.h5", Phi4(1.0, 0.0), lattice, phi))
    four = analysis.analyse(write_ensemble(tmp_path / "four.h5", Phi4(1.0, 0.0), lattice, phi,
                                           chain=np.arange(2000) % 4))
    assert four.chain_lengths == (500,) * 4 and one.chain_lengths == (2000,)
    for name, o in one.observables.items():
        assert four.observables[name].value == pytest.approx(o.value, rel=1e-12, abs=1e-14)
        assert four.observables[name].error == pytest.approx(o.error, rel=0.15), name
    np.testing.assert_allclose(four.correlators.g, one.correlators.g, atol=3 * one.correlators
                               .g_error.max())


def test_thermalization_drops_rows_per_chain(tmp_path):
    """The first K rows of each of 3 chains are far off equilibrium; dropping K per chain must
    give exactly the statistics of the remaining rows."""
    n_chains, k, length = 3, 7, 200
    values = np.random.default_rng(6).standard_normal((n_chains, length)) * 0.3
    values[:, :k] = 50.0
    rows = values.T.reshape(-1)
    path = write_ensemble(tmp_path / "therm.h5", Phi4(1.0, 0.0), (2, 2),
                          constant_fields(rows, (2, 2)), chain=np.arange(rows.size) % n_chains)
    clean = values[:, k:]
    result = analysis.analyse(path, thermalization=k)
    assert result.n == n_chains * (length - k) and result.thermalization == k
    assert result.observables["magnetization_squared"].value == pytest.approx(np.mean(clean**2))
    assert result.observables["abs_magnetization"].value == pytest.approx(np.mean(abs(clean)))
    assert [len(h) for h in result.histories["m"]] == [length] * n_chains
    untouched = analysis.analyse(path, thermalization=k - 1)
    assert untouched.observables["magnetization_squared"].value > 10
    with pytest.raises(LatticeflowError, match="K = 200.*need K < N"):
        analysis.analyse(path, thermalization=length)
    with pytest.raises(LatticeflowError, match="at least 4"):
        analysis.analyse(path, thermalization=length - 2)


def test_chunked_reading_and_in_memory_source_agree(free_file, free_result):
    """333-row chunks (not aligned with the 64-row HDF5 chunks) and an in-memory Ensemble give
    the results of one read; the G_c value is the plain mean whatever the binning."""
    small = analysis.analyse(free_file, chunk_bytes=333 * 24 * 8 * 3)
    memory = analysis.analyse(read_ensemble(free_file))
    coarse = analysis.analyse(free_file, max_micro_bins=300)
    for other in (small, memory):
        for name, o in free_result.observables.items():
            assert other.observables[name].value == pytest.approx(o.value, rel=1e-12)
            assert other.observables[name].error == pytest.approx(o.error, rel=1e-10)
        np.testing.assert_allclose(other.correlators.g, free_result.correlators.g, rtol=1e-10)
        np.testing.assert_allclose(other.correlators.g_error, free_result.correlators.g_error,
                                   rtol=1e-8)
    # 4000 rows in micro-bins of 14: 2 rows left out, so G_c moves by far less than its error
    assert np.abs(coarse.correlators.g - free_result.correlators.g).max() < \
        0.1 * free_result.correlators.g_error.min()


def test_micro_and_jackknife_bins():
    layout = analysis.chain_layout(np.arange(103) % 2, 103, thermalization=3)
    bins = analysis.MicroBins(layout, 103, 1, max_bins=20)
    assert bins.size == 5                                   # ceil(97 / 20)
    values = torch.arange(103, dtype=torch.float64)[:, None]
    bins.add(0, values[:50])
    bins.add(50, values[50:])
    chain0 = np.arange(6, 103, 2)[:45]                      # 49 kept rows → 9 bins of 5
    np.testing.assert_allclose(bins.means()[:9, 0], chain0.reshape(9, 5).mean(axis=1))
    assert bins.n_bins == 9 + 9
    assert analysis.jackknife_bins(7920, 1980, 2.6, 100) == 99    # 1980 = 99 × 20
    assert analysis.jackknife_bins(1000, 1000, 0.5, 100) == 100
    assert analysis.jackknife_bins(100, 100, 50.0, 100) == 2


def test_stored_action_mismatch_is_reported(tmp_path, caplog):
    lattice = (4, 4)
    phi = free_field_samples(lattice, 1.0, 40, seed=7)
    path = write_ensemble(tmp_path / "bad.h5", Phi4(1.0, 0.0), lattice, phi,
                          action_values=np.zeros(40))
    with caplog.at_level(logging.WARNING, logger="latticeflow.measure"):
        analysis.analyse(path, correlators=False)
    assert "differs from S recomputed" in caplog.text


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def test_compare_deviations(free_result, u1_file, tmp_path):
    lattice = (6, 4)
    other = analysis.analyse(write_ensemble(tmp_path / "other.h5", Phi4(0.5, 0.0), lattice,
                                            free_field_samples(lattice, 0.5, 1000, seed=8)),
                             correlators=False)
    comparison = analysis.compare([free_result, other], labels=["A", "B"])
    assert comparison.names == list(analysis.PHI4_OBSERVABLES)
    for i, name in enumerate(comparison.names):
        a, b = free_result.observables[name], other.observables[name]
        assert comparison.deviations[i, 0] == 0.0
        assert comparison.deviations[i, 1] == pytest.approx(
            (b.value - a.value) / math.hypot(a.error, b.error))
    assert comparison.exact == free_result.exact.scalars
    record = comparison.as_dict()
    assert [e["label"] for e in record["ensembles"]] == ["A", "B"]
    assert record["observables"]["chi2"]["values"][1]["deviation"] == pytest.approx(
        comparison.deviations[2, 1])
    assert analysis.deviation(1.0, 0.0, 1.0) == 0.0
    assert analysis.deviation(2.0, 0.0, 1.0) == math.inf
    with pytest.raises(LatticeflowError, match="no observables in common"):
        analysis.compare([free_result, analysis.analyse(u1_file, correlators=False)])


# --------------------------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------------------------


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"analysis_script_{name}",
                                                  ROOT / "analysis" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "analysis" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_observables_script_json_and_plots(free_file, free_result, tmp_path):
    """Real subprocess: exit 0, the exact JSON schema, values equal to analyse(), PNGs."""
    out = tmp_path / "obs.json"
    done = run_script("observables", str(free_file), "--json", str(out), "--plots",
                      str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert set(record) == {"n", "sampler", "acceptance", "observables"}
    assert record["n"] == 4000 and record["sampler"] == "hmc"
    assert record["acceptance"] == pytest.approx(free_result.acceptance)
    assert set(record["observables"]) == set(analysis.PHI4_OBSERVABLES)
    for name, entry in record["observables"].items():
        assert set(entry) == OBSERVABLE_KEYS
        assert all(isinstance(entry[key], float) for key in OBSERVABLE_KEYS)
        assert entry["value"] == pytest.approx(free_result.observables[name].value, rel=1e-12)
    assert "chi2" in done.stdout and "±" in done.stdout
    for png in ("histories.png", "correlators.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_observables_script_thermalization(u1_file, tmp_path, capsys):
    out = tmp_path / "u1.json"
    assert load_script("observables").main([str(u1_file), "-K", "100", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["n"] == 3000 - 2 * 100 and record["sampler"] == "nmcmc"
    assert set(record["observables"]) == set(analysis.U1_OBSERVABLES)
    assert "topological_charge_squared" in capsys.readouterr().out


def test_autocorrelation_script(free_file, tmp_path, capsys):
    out = tmp_path / "tau.json"
    code = load_script("autocorrelation").main([str(free_file), "--json", str(out), "--plots",
                                                str(tmp_path / "p")])
    assert code == 0
    record = json.loads(out.read_text())
    assert set(record) == {"n", "sampler", "thermalization", "observables"}
    for entry in record["observables"].values():
        assert set(entry) == {"tau_int", "tau_int_error", "window"}
        assert entry["tau_int"] == pytest.approx(0.5, abs=0.1)
    assert {p.name for p in (tmp_path / "p").iterdir()} == {
        "histories.png", "autocorrelation.png", "tau_int.png"}
    assert "window W" in capsys.readouterr().out


def test_compare_script(free_file, tmp_path, capsys):
    lattice = (6, 4)
    shifted = write_ensemble(tmp_path / "m2.h5", Phi4(0.4, 0.0), lattice,
                             free_field_samples(lattice, 0.4, 4000, seed=9))
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    code = load_script("compare").main([str(free_file), str(shifted), "--labels", "m2=0.5,m2=0.4",
                                        "--json", str(out), "--plot", str(png)])
    assert code == 0
    record = json.loads(out.read_text())
    chi2 = record["observables"]["chi2"]["values"]
    assert chi2[0]["deviation"] == 0.0
    assert chi2[1]["deviation"] > 5            # χ₂ = 1.25 against 1.0, errors ~1.5 %
    assert record["observables"]["chi2"]["exact"] is None     # different m²: no common exact
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "m2=0.4" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, free_file) -> dict[str, list[str]]:
    directory = tmp_path_factory.mktemp("bad")
    foreign = directory / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(4)
    truncated = directory / "truncated.h5"
    truncated.write_bytes(free_file.read_bytes()[:-4096])
    return {"missing": [str(directory / "missing.h5")], "foreign": [str(foreign)],
            "truncated": [str(truncated)], "K >= N": [str(free_file), "-K", "4000"]}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", ["missing", "foreign", "truncated", "K >= N"])
def test_scripts_reject_bad_input_in_one_line(script, case, bad_inputs, capsys):
    code = load_script(script).main(bad_inputs[case])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_script_bad_input_subprocess(bad_inputs):
    """The real process: exit status 2, one stderr line, no traceback."""
    done = run_script("compare", bad_inputs["foreign"][0], bad_inputs["missing"][0])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"compare.py: error: {bad_inputs['foreign'][0]}: not a latticeflow ensemble "
        "(format attribute is None, expected 'latticeflow-ensemble')"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_help_has_example(script, capsys):
    with pytest.raises(SystemExit) as stop:
        load_script(script).main(["--help"])
    assert stop.value.code == 0
    assert f"python analysis/{script}.py" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Plots and formatting
# --------------------------------------------------------------------------------------------


def test_all_plots_are_written(free_result, u1_file, tmp_path):
    u1 = analysis.analyse(u1_file, thermalization=5)
    written = plots.standard_plots(free_result, tmp_path / "phi4", autocorrelation=True)
    written += plots.standard_plots(u1, tmp_path / "u1")
    written.append(plots.plot_comparison(analysis.compare([free_result, free_result]),
                                         tmp_path / "cmp.png"))
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert names == {"phi4/histories.png", "phi4/autocorrelation.png", "phi4/tau_int.png",
                     "phi4/correlators.png", "u1/histories.png", "u1/topological_charge.png",
                     "u1/wilson_loops.png", "cmp.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    with pytest.raises(ValueError, match="no correlators"):
        plots.plot_correlators(u1, tmp_path / "x.png")


def test_formatting():
    assert ss.format_value(1.23456, 0.0012) == "1.2346 ± 0.0012"
    assert ss.format_value(123.456, 12.3) == "123 ± 12"
    assert ss.format_value(2.5e-6, 3.1e-7) == "(2.50 ± 0.31)e-6"
    assert ss.format_value(0.5, 0.0) == "0.5"
    assert ss.format_value(2.38503, math.nan) == "2.385 ± nan"
    assert ss.format_value(math.nan, 0.1) == "nan"
    assert ss.format_deviation(-1.26) == "-1.3σ" and ss.format_deviation(math.nan) == ""
    assert ss.json_safe({"a": np.float64(math.nan), "b": [np.int64(2), math.inf]}) == {
        "a": None, "b": [2, None]}
    assert ss.parse_int_list("5", 3, "-K") == [5, 5, 5]
    with pytest.raises(LatticeflowError, match="2 values given for 3"):
        ss.parse_int_list("1,2", 3, "-K")


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def _write_metrics(path: Path, seconds_per_step: float, ess_of_step) -> Path:
    """A metrics.csv of 400 steps: loss −step/100, ESS every 100 steps."""
    path.mkdir(parents=True)
    lines = [",".join(METRIC_COLUMNS)]
    for step in range(1, 401):
        ess = f"{ess_of_step(step)}" if step % 100 == 0 else ""
        lines.append(f"{step},{-step / 100},{ess},1.0,0.001,{step * seconds_per_step},0")
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


def test_training_curves_at_common_budget(tmp_path, capsys):
    """Run A takes 0.5 s per step, B 1 s; the common budget is A's 200 s. ESS every 100 steps:
    A's ESS is step/1000, B's step/2000."""
    fast = _write_metrics(tmp_path / "fast", 0.5, lambda s: s / 1000)
    slow = _write_metrics(tmp_path / "slow", 1.0, lambda s: s / 2000)
    script = load_script("training_curves")
    code = script.main([str(fast), str(slow / "metrics.csv"), "--plot",
                        str(tmp_path / "out" / "curves.png")])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and (tmp_path / "out" / "curves.png").stat().st_size > 0
    assert out[0].startswith("common budget: 200 s")  # the shorter run: A, 400 steps at 0.5 s
    rows = {line.split()[0]: line.split()[1:] for line in out[2:4]}
    # A: ESS 0.1 at 50 s, 0.2 at 100 s, 0.3 at 150 s, 0.4 at 200 s; mean loss of steps 301-400.
    assert rows["fast"] == ["400", "0.100", "0.200", "0.300", "0.400", "-3.5050"]
    # B by 200 s: 200 steps, ESS 0.05 from 100 s on, nothing before; loss of steps 101-200.
    assert rows["slow"] == ["200", "nan", "0.050", "0.050", "0.100", "-1.5050"]


def test_training_curves_rejects_a_non_run_in_one_line(tmp_path, capsys):
    code = load_script("training_curves").main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"training_curves.py: error: {tmp_path}: no metrics.csv "
                      "(not a training run directory)")
