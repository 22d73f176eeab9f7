"""pyerrors interoperability (latticeflow.measure.pyerrors_export, ``analysis/observables.py
--pyerrors``) and a cross-check of latticeflow's Γ-method against pyerrors' on the same series.

Ensembles (4×4, a few seconds each): φ⁴ HMC runs with 2 chains and with 1 chain, and a
1-chain neural-MCMC run of a briefly trained U(1) flow, and a constructed AR(1) chain with negative
lag-1 correlation. The differences between the two Γ-methods that are there by design are
derived next to the tests that bound them (and summarised in docs/python-api.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import latticeflow as lf
from latticeflow.statistics import GammaResult, ShortChainWarning, gamma_method

pe = pytest.importorskip("pyerrors")

ROOT = Path(__file__).resolve().parents[1]
PHI4_CARD = ROOT / "actions" / "phi4_m2-4_lam8.toml"
U1_CARD = ROOT / "actions" / "u1_beta2.toml"
S_TAU = 1.5            # latticeflow's window parameter (statistics.gamma_method's default)
#: two FFT implementations (numpy's in pyerrors, scipy's with other padding in latticeflow)
#: summing the same products: agreement to round-off, far below any statistical meaning
ROUND_OFF = 1e-10
THERM = 20
pytestmark = pytest.mark.filterwarnings("ignore::latticeflow.statistics.ShortChainWarning")


# --------------------------------------------------------------------------------------------
# Ensembles
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pyerrors")


@pytest.fixture(scope="module")
def hmc2(folder: Path) -> Path:
    """φ⁴ (m² = −4, λ = 8) on 4×4, HMC with 2 chains × 400 rows."""
    lf.hmc(PHI4_CARD, "4x4", 800, chains=2, therm=30, seed=3, out=folder / "hmc2.h5")
    return folder / "hmc2.h5"


@pytest.fixture(scope="module")
def hmc1(folder: Path) -> Path:
    """φ⁴ (m² = −4, λ = 8) on 4×4, HMC with 1 chain × 700 rows."""
    lf.hmc(PHI4_CARD, (4, 4), 700, therm=30, seed=5, out=folder / "hmc1.h5")
    return folder / "hmc1.h5"


@pytest.fixture(scope="module")
def nmcmc(folder: Path) -> Path:
    """U(1), β = 2, on 4×4: a flow (plaquette prior, 2 couplings) trained for 5 steps, then
    neural MCMC, 1 chain × 2000 rows (acceptance ≈ 0.7, τ_int ≈ 1)."""
    recipe = folder / "tiny.toml"
    recipe.write_text(f'action = "{U1_CARD}"\nlattice = [4, 4]\ndevice = "cpu"\n'
                      "[flow]\nn_couplings = 2\nhidden = [4]\n"
                      "[training]\nbatch_size = 32\nsteps = 5\nlr = 0.01\ness_interval = 5\n"
                      "ess_batch = 256\n")
    lf.train(recipe, out=folder / "tiny")
    lf.nmcmc(folder / "tiny", 2000, batch_size=1000, chunk=1000, seed=4,
             out=folder / "nmcmc.h5")
    return folder / "nmcmc.h5"


@pytest.fixture(params=["hmc2", "hmc1", "nmcmc"])
def ensemble(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------------------------
# Export and round trip
# --------------------------------------------------------------------------------------------


def test_round_trip(ensemble: Path, tmp_path: Path) -> None:
    """pyerrors' own load_json reads the file back: one Obs per observable, tagged with its
    name, on the replicas NAME|r<c> with the kept rows' numbers, with latticeflow's values;
    the description holds the provenance."""
    result = lf.analyse(ensemble, thermalization=THERM)
    out = tmp_path / "obs.json.gz"
    exported = lf.to_pyerrors(ensemble, thermalization=THERM, out=out)
    assert list(exported) == list(result.observables)
    loaded = pe.input.json.load_json(str(out), verbose=False, full_output=True)
    replicas = [f"{ensemble.stem}|r{c}" for c in range(result.n_chains)]
    assert [o.tag for o in loaded["obsdata"]] == list(result.observables)
    for o in loaded["obsdata"]:
        reference = result.observables[o.tag]
        assert o.value == pytest.approx(reference.value, rel=1e-12, abs=1e-15), o.tag
        assert o.names == replicas
        for replica, length in zip(replicas, result.chain_lengths, strict=True):
            assert o.idl[replica] == range(THERM + 1, length + 1)
    description = loaded["description"]
    meta = lf.read_ensemble(ensemble).metadata
    assert description["ensemble"] == ensemble.stem
    assert description["theory"] == meta.theory
    assert description["action_params"] == meta.action_params
    assert description["lattice"] == list(meta.lattice)
    assert description["sampler"] == meta.sampler
    assert description["seed"] == meta.seed
    assert description["sampler_params"] == json.loads(json.dumps(meta.sampler_params))
    assert description["latticeflow_version"] == meta.latticeflow_version
    assert description["thermalization"] == THERM
    assert description["observables"] == list(result.observables)




def test_in_memory_and_result_sources(nmcmc: Path) -> None:
    """An in-memory ensemble and an AnalysisResult give the same Obs as the file."""
    from_file = lf.to_pyerrors(nmcmc, thermalization=THERM)
    in_memory = lf.to_pyerrors(lf.read_ensemble(nmcmc), thermalization=THERM, name="u1")
    from_result = lf.to_pyerrors(lf.analyse(nmcmc, thermalization=THERM))
    for name, obs in from_file.items():
        assert in_memory[name].names == ["u1|r0"]
        for other in (in_memory[name], from_result[name]):
            assert np.array_equal(other.deltas[other.names[0]], obs.deltas[obs.names[0]])
            assert other.value == obs.value


def test_refusals(nmcmc: Path, tmp_path: Path) -> None:
    out = tmp_path / "obs.json"
    lf.to_pyerrors(nmcmc, out=out)
    before = out.read_bytes()
    with pytest.raises(lf.LatticeflowError, match="already exists"):
        lf.to_pyerrors(nmcmc, out=out)
    assert out.read_bytes() == before
    lf.to_pyerrors(nmcmc, thermalization=THERM, out=out, overwrite=True)
    assert out.read_bytes() != before
    with pytest.raises(lf.LatticeflowError, match=r"\.json"):
        lf.to_pyerrors(nmcmc, out=tmp_path / "obs.txt")
    with pytest.raises(lf.LatticeflowError, match="does not exist"):
        lf.to_pyerrors(nmcmc, out=tmp_path / "missing" / "obs.json")
    with pytest.raises(lf.LatticeflowError, match=r"without '\|'"):
        lf.to_pyerrors(nmcmc, name="a|b")
    with pytest.raises(lf.LatticeflowError, match="at least 5 rows"):
        lf.to_pyerrors(nmcmc, thermalization=1996)
    with pytest.raises(lf.LatticeflowError, match="fixed by the AnalysisResult"):
        lf.to_pyerrors(lf.analyse(nmcmc), thermalization=THERM)


def test_missing_pyerrors_is_a_clear_error(nmcmc: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from latticeflow.measure.pyerrors_export import PyerrorsMissing

    monkeypatch.setitem(sys.modules, "pyerrors", None)  # import pyerrors → ImportError
    with pytest.raises(PyerrorsMissing, match=r"latticeflow\[pyerrors\]"):
        lf.to_pyerrors(nmcmc)


def test_script_option(hmc2: Path, tmp_path: Path) -> None:
    """analysis/observables.py --pyerrors writes the file (replacing an old one, like --json),
    and its Obs carry the script's JSON values."""
    spec = importlib.util.spec_from_file_location("observables_script",
                                                  ROOT / "analysis" / "observables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, record = tmp_path / "hmc2.json.gz", tmp_path / "hmc2.json"
    out.write_text("old")
    argv = [str(hmc2), "-K", str(THERM), "--json", str(record), "--pyerrors", str(out), "-q"]
    assert script.main(argv) == 0
    values = json.loads(record.read_text())["observables"]
    loaded = pe.input.json.load_json(str(out), verbose=False)
    assert [o.tag for o in loaded] == list(values)
    for o in loaded:
        assert o.value == pytest.approx(values[o.tag]["value"], rel=1e-12, abs=1e-15)


# --------------------------------------------------------------------------------------------
# Γ-method cross-check
# --------------------------------------------------------------------------------------------
#
# Both implement Wolff's Γ-method with the automatic window W (first W with g(W) < 0) and the
# bias correction of eq. (49), so on one chain whose ρ(1) >= 0 they pick the same W and give
# the same error (pyerrors' sqrt(2 τ_py Γ(0)(1+1/N)/N) is algebraically latticeflow's
# sqrt(C_F(W)(1+(2W+1)/N)/N)). Differences by design:
#
# (a) τ_int. pyerrors: τ_py = τ_n (1+(2W+1)/N)/(1+1/N), τ_n = ½ + Σ_{t<=W} ρ(t) uncorrected;
#     latticeflow: τ = C_F'/(2Γ'(0)) with the corrected Γ'(0) = Γ(0) + C_F/N, i.e.
#     τ = τ_n (1+(2W+1)/N)/(1+2τ_n/N). So τ / τ_py = (1+1/N)/(1+2τ_n/N), exactly: a relative
#     difference of (2τ_n − 1)/N < 2τ/N.
# (b) error of τ_int, both 2τ sqrt((W+½−τ)/N) (Madras–Sokal), latticeflow with its corrected τ,
#     pyerrors with τ_n: by (a), τ/τ_n − 1 ≈ (2W+1−2τ)/N, and the square root moves by about
#     τ/N, so the two differ by less than (2W+1)/N; bounded by 2(2W+1)/N.
# (c) several chains: latticeflow subtracts the global mean (Wolff §3), pyerrors each replica's
#     own mean. Γ(t) then differs by about B = Σ_r N_r (ā_r − ā)²/N at every small lag; the
#     replica means scatter with variance C_F/N_r, so E[B] = (R−1) C_F/N and C_F(W), a sum of
#     2W+1 lags, moves by (2W+1)(R−1)/N relative to itself on average (the error by half of
#     that, τ_int by up to all of it). B/E[B] is χ²_{R−1}/(R−1); at the 99.8 % point of χ²_1
#     (≈ 10) this gives the bounds 5(2W+1)(R−1)/N for the error and 10(2W+1)(R−1)/N for τ_int.
#     With every replica centred on its own mean both see the same Γ(t) and agree as in (a).
# (d) ρ(1) < 0: pyerrors clamps τ_n(W) <= ½ to ½ + ε, so its window criterion stops at W = 1
#     with τ_py = (½+ε)(1+3/N)/(1+1/N) and an error close to the naive one; latticeflow picks
#     the window on |ρ| and sums the signed ρ (see statistics.gamma_method).
# (e) functions of means: latticeflow's gradient f is a central difference with step
#     h_α = sqrt(Γ_αα(0)/N) (statistics.gamma_method), pyerrors' is exact. Both are exact for
#     the linear and quadratic χ_t and χ₂. For the Binder cumulant U = 1 − m4/(3 m2²) the m2
#     component has the truncation error h²f'''/6 (relative 2h²/m2²), and a different
#     projected series can also end in another window. So the check is exact twice over:
#     latticeflow on the exact-gradient projection equals pyerrors' U, and pyerrors on the
#     central-difference projection equals latticeflow's U.


def _pyerrors_gamma(obs: pe.Obs) -> tuple[int, float, float, float, int]:
    """pyerrors' Γ-method at S_τ = 1.5: window, τ_int, its error, τ_n(W), N."""
    obs.gamma_method(S=S_TAU)
    name = obs.mc_names[0]
    window = int(obs.e_windowsize[name])
    return (window, float(obs.e_tauint[name]), float(obs.e_dtauint[name]),
            float(obs.e_n_tauint[name][window]), int(obs.N))


def _check_one_chain(ours: GammaResult, obs: pe.Obs) -> str:
    """Compare on one replica by (a), (b) and (d); returns the branch taken."""
    window, tau_py, dtau_py, tau_n, n = _pyerrors_gamma(obs)
    if ours.rho[1] < 0:
        assert window == 1
        assert tau_py == pytest.approx((0.5 + np.finfo(float).eps) * (1 + 3 / n) / (1 + 1 / n),
                                       rel=ROUND_OFF)
        return "anticorrelated"
    assert window == ours.window
    assert ours.error == pytest.approx(obs.dvalue, rel=ROUND_OFF)
    assert ours.tau_int == pytest.approx(tau_py * (1 + 1 / n) / (1 + 2 * tau_n / n),
                                         rel=ROUND_OFF)
    assert abs(ours.tau_int / tau_py - 1) < 2 * ours.tau_int / n + ROUND_OFF
    assert abs(ours.tau_int_error / dtau_py - 1) < 2 * (2 * window + 1) / n
    return "same window"


def _check_binder(result: lf.AnalysisResult, obs: pe.Obs) -> None:
    """(e) for the Binder cumulant U = 1 − <m4>/(3<m2>²) of one chain, m4 = m2²."""
    m2 = np.concatenate([h[result.thermalization:] for h in result.histories["m2"]])
    series = np.column_stack([m2, m2**2])
    means = series.mean(axis=0)

    def binder(a: np.ndarray) -> float:
        return 1 - a[1] / (3 * a[0] ** 2)

    exact = np.array([2 * means[1] / (3 * means[0] ** 3), -1 / (3 * means[0] ** 2)])
    steps = np.sqrt(series.var(axis=0) / len(series))
    central = np.array([(binder(means + h * e) - binder(means - h * e)) / (2 * h)
                        for h, e in zip(steps, np.eye(2), strict=True)])
    _check_one_chain(gamma_method(series @ exact), obs)
    name = obs.names[0]
    projected = pe.Obs([series @ central], [name], idl=[obs.idl[name]])
    _check_one_chain(result.observables["binder"].gamma, projected)


@pytest.mark.parametrize("name", ["hmc1", "nmcmc"])
def test_gamma_one_chain(name: str, request: pytest.FixtureRequest) -> None:
    """Single-chain HMC and neural-MCMC ensembles: every observable, (a), (b), (d), (e)."""
    result = lf.analyse(request.getfixturevalue(name), thermalization=THERM)
    exported = lf.to_pyerrors(result)
    branches = set()
    for observable, obs in exported.items():
        if observable == "binder":
            _check_binder(result, obs)
        else:
            branches.add(_check_one_chain(result.observables[observable].gamma, obs))
    assert "same window" in branches


def test_gamma_replicas(hmc2: Path) -> None:
    """Two chains: exact agreement once every replica is centred on its own mean, and the
    raw difference (c) within its bound."""
    result = lf.analyse(hmc2, thermalization=THERM)
    exported = lf.to_pyerrors(result)
    n, n_replicas = result.n, result.n_chains
    for observable, history, transform in (("abs_magnetization", "m", np.abs),
                                           ("magnetization_squared", "m2", np.asarray)):
        chains = [transform(h[THERM:]) for h in result.histories[history]]
        mean = np.concatenate(chains).mean()
        centred = gamma_method([c - c.mean() + mean for c in chains])
        assert _check_one_chain(centred, exported[observable]) == "same window"
    for observable, obs in exported.items():
        ours = result.observables[observable].gamma
        window, tau_py, _, _, _ = _pyerrors_gamma(obs)
        assert abs(window - ours.window) <= 1, observable
        lags = (2 * max(window, ours.window) + 1) * (n_replicas - 1) / n
        assert abs(ours.error / obs.dvalue - 1) < 5 * lags, observable
        assert abs(ours.tau_int / tau_py - 1) < 10 * lags, observable


def test_gamma_anticorrelated_ar1() -> None:
    """AR(1) with ρ = −0.5: exact τ_int = (1+ρ)/(2(1−ρ)) = 1/6 and error
    sqrt(2τ σ²/N), σ² = 1/(1−ρ²). latticeflow finds both (within 3 of its own errors);
    pyerrors (d) stops at W = 1 and reports the naive error sqrt(Γ(0)(1+3/N)/N), which here is
    sqrt(1/(2τ)) = √3 times too large."""
    rho, n = -0.5, 20000
    rng = np.random.default_rng(7)
    x = np.empty(n)
    x[0] = rng.standard_normal() / math.sqrt(1 - rho**2)
    for i, noise in enumerate(rng.standard_normal(n - 1), start=1):
        x[i] = rho * x[i - 1] + noise
    tau_exact = (1 + rho) / (2 * (1 - rho))
    error_exact = math.sqrt(2 * tau_exact / (1 - rho**2) / n)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortChainWarning)
        ours = gamma_method(x)
    assert ours.window > 1
    assert abs(ours.tau_int - tau_exact) < 3 * ours.tau_int_error
    assert abs(ours.error - error_exact) < 3 * ours.error_of_error
    obs = pe.Obs([x], ["ar1|r0"])
    assert _check_one_chain(ours, obs) == "anticorrelated"
    tau_py = (0.5 + np.finfo(float).eps) * (1 + 3 / n) / (1 + 1 / n)
    naive = math.sqrt(2 * tau_py * x.var() * (1 + 1 / n) / n)
    assert obs.dvalue == pytest.approx(naive, rel=ROUND_OFF)
    # √3, up to latticeflow's own error (3 error_of_error ≈ 8 %) and Γ(0)'s (≈ 1 %)
    assert obs.dvalue / ours.error == pytest.approx(math.sqrt(1 / (2 * tau_exact)), rel=0.1)
