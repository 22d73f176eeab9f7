"""The Python API (latticeflow.api, re-exported as ``import latticeflow as lf``): every public
name on a tiny case, the same ensembles as the command line (bit for bit, same seed and
settings), the same numbers as analysis/observables.py, and clear errors on bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import latticeflow as lf
from latticeflow import cli, statistics
from latticeflow.base.errors import ConfigError
from latticeflow.config import Recipe
from latticeflow.theories import Phi4, U1Wilson

ROOT = Path(__file__).resolve().parents[1]
PHI4_CARD = ROOT / "actions" / "phi4_m2-4_lam8.toml"
U1_CARD = ROOT / "actions" / "u1_beta2.toml"
RECIPE = f"""\
action = "{PHI4_CARD}"
lattice = [4, 4]
device = "cpu"
[flow]
n_couplings = 2
hidden = [4]
[training]
batch_size = 16
steps = 3
ess_interval = 3
ess_batch = 32
[sampling]
n = 40
batch_size = 16
chunk = 20
"""
HMC_ARGS = ["--lattice", "4x4", "--n", "30", "--therm", "5", "--chunk", "10", "--chains", "2",
            "--seed", "7"]
HMC_KWARGS = {"therm": 5, "chunk": 10, "chains": 2, "seed": 7}


def same_file(a: Path, b: Path) -> None:
    """Every dataset (rows and resume state) and attribute equal, bit for bit, but the
    creation time."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visit(names.append)
        other: list[str] = []
        fb.visit(other.append)
        assert names == other
        for name in names:
            if isinstance(fa[name], h5py.Dataset):
                np.testing.assert_equal(fa[name][()], fb[name][()], err_msg=name)
                assert fa[name].dtype == fb[name].dtype, name
        assert set(fa.attrs) == set(fb.attrs)
        for key in fa.attrs:
            if key != "created":
                np.testing.assert_equal(fa.attrs[key], fb.attrs[key], err_msg=key)  # NaN == NaN


def same_rows(a: lf.Ensemble, b: lf.Ensemble) -> None:
    assert a.data.keys() == b.data.keys()
    for name in a.data:
        assert np.array_equal(a[name], b[name]), name
        assert a[name].dtype == b[name].dtype, name


# --------------------------------------------------------------------------------------------
# The namespace
# --------------------------------------------------------------------------------------------


def test_import_is_lazy() -> None:
    """``import latticeflow`` (the command line's first step) does not import torch."""
    code = "import sys, latticeflow; print('torch' in sys.modules, latticeflow.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["False", lf.__version__]


def test_public_names() -> None:
    assert {"load_action", "load_recipe", "train", "load_flow", "nmcmc", "hmc",
            "read_ensemble", "analyse", "observables", "gamma_method",
            "to_pyerrors"} <= set(lf.__all__)
    for name in lf.__all__:
        assert getattr(lf, name) is not None, name
    assert set(lf.__all__) <= set(dir(lf))
    assert lf.observables is importlib.import_module("latticeflow.observables")
    assert lf.gamma_method is statistics.gamma_method
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = lf.no_such_name


def test_building_blocks() -> None:
    links = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 * torch.pi
    q = lf.observables.topological_charge(links)
    assert torch.allclose(q, q.round(), atol=1e-9)
    series = np.random.default_rng(0).standard_normal(400)
    assert lf.gamma_method(series).value == pytest.approx(series.mean())


# --------------------------------------------------------------------------------------------
# Cards and recipes
# --------------------------------------------------------------------------------------------


def test_load_action(tmp_path: Path) -> None:
    action = lf.load_action(PHI4_CARD)
    assert isinstance(action, Phi4) and (action.m2, action.lam) == (-4.0, 8.0)
    assert lf.load_action(action) is action
    with pytest.raises(lf.LatticeflowError, match="missing.toml"):
        lf.load_action(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('theory = "u1"\nbeta = -1.0\n')
    with pytest.raises(ConfigError, match="beta"):
        lf.load_action(bad)


def test_load_recipe(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    recipe = lf.load_recipe(path, {"training.steps": 7})
    assert isinstance(recipe, Recipe) and recipe.training.steps == 7
    assert recipe.lattice == (4, 4) and recipe.name == "tiny"
    with pytest.raises(ConfigError, match="training.steps"):
        lf.load_recipe(path, {"training.steps": "many"})


# --------------------------------------------------------------------------------------------
# HMC: the same file as `latticeflow hmc`, the same numbers as analysis/observables.py
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hmc_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hmc")
    ours, theirs = folder / "api.h5", folder / "cli.h5"
    lf.hmc(U1_CARD, "4x4", 30, out=ours, **HMC_KWARGS)
    assert cli.main(["-q", "hmc", str(U1_CARD), *HMC_ARGS, "--out", str(theirs)]) == 0
    return ours, theirs


def test_hmc_equals_the_command(hmc_files: tuple[Path, Path]) -> None:
    ours, theirs = hmc_files
    same_file(ours, theirs)
    ensemble = lf.read_ensemble(ours)
    assert len(ensemble) == 30 and ensemble.metadata.sampler == "hmc"
    assert ensemble["configs"].shape == (30, 2, 4, 4)
    assert np.array_equal(ensemble["chain"], np.arange(30) % 2)


def test_hmc_in_memory(hmc_files: tuple[Path, Path]) -> None:
    in_memory = lf.hmc(lf.load_action(U1_CARD), (4, 4), 30, **HMC_KWARGS)
    assert in_memory.metadata.path == "<in memory>"
    same_rows(in_memory, lf.read_ensemble(hmc_files[0]))


def test_hmc_resume(hmc_files: tuple[Path, Path], tmp_path: Path) -> None:
    """A file grown in two calls (resume) equals the one written in one."""
    path = tmp_path / "grown.h5"
    lf.hmc(U1_CARD, "4x4", 20, out=path, **HMC_KWARGS)
    grown = lf.hmc(U1_CARD, "4x4", 30, out=path, resume=True, **HMC_KWARGS)
    same_rows(grown, lf.read_ensemble(hmc_files[0]))
    with pytest.raises(lf.LatticeflowError, match="cannot resume: seed"):
        lf.hmc(U1_CARD, "4x4", 40, out=path, resume=True, **{**HMC_KWARGS, "seed": 8})
    with pytest.raises(lf.LatticeflowError, match="already exists"):
        lf.hmc(U1_CARD, "4x4", 40, out=path, **HMC_KWARGS)
    replaced = lf.hmc(U1_CARD, "4x4", 10, out=path, force=True, **HMC_KWARGS)
    assert len(replaced) == 10
    with pytest.raises(lf.LatticeflowError, match="is a directory"):
        lf.hmc(U1_CARD, "4x4", 10, out=tmp_path, force=True, **HMC_KWARGS)
    with pytest.raises(lf.LatticeflowError, match="exclude each other"):
        lf.hmc(U1_CARD, "4x4", 10, out=path, force=True, resume=True, **HMC_KWARGS)


def test_analyse_equals_the_script(hmc_files: tuple[Path, Path], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("observables_script",
                                                  ROOT / "analysis" / "observables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    record = tmp_path / "observables.json"
    assert script.main([str(hmc_files[1]), "-K", "4", "--json", str(record), "-q"]) == 0
    expected = json.loads(record.read_text())
    for source in (hmc_files[0], lf.read_ensemble(hmc_files[0])):
        result = lf.analyse(source, thermalization=4)
        assert isinstance(result, lf.AnalysisResult)
        assert (result.n, result.sampler) == (expected["n"], expected["sampler"])
        assert result.acceptance == expected["acceptance"]
        assert list(result.observables) == list(expected["observables"])
        for name, o in result.observables.items():
            assert isinstance(o, lf.ObservableResult)
            assert [o.value, o.error, o.tau_int, o.tau_int_error] == [
                expected["observables"][name][key]
                for key in ("value", "error", "tau_int", "tau_int_error")], name


@pytest.mark.parametrize("kwargs, match", [
    ({"lattice": "4y4"}, "lattice must look like"),
    ({"lattice": (0, 4)}, "positive"),
    ({"lattice": (4, 4, 4)}, "lattice 4x4x4"),
    ({"n": 0}, "n must be a positive integer"),
    ({"chunk": 0}, "chunk must be a positive integer"),
    ({"seed": -1}, "seed"),
    ({"device": "tpu"}, "tpu"),
    ({"chains": 0}, "n_chains"),
    ({"target_accept": 2.0}, "target_accept"),
    ({"integrator": "euler"}, "integrator"),
    ({"resume": True}, "out="),
])
def test_hmc_bad_input(kwargs: dict, match: str) -> None:
    arguments = {"action": U1_CARD, "lattice": "4x4", "n": 5, **kwargs}
    with pytest.raises(lf.LatticeflowError, match=match):
        lf.hmc(**arguments)


# --------------------------------------------------------------------------------------------
# Training, flow samples and neural MCMC: the same file as `latticeflow sample`
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    (folder / "tiny.toml").write_text(RECIPE)
    result = lf.train(folder / "tiny.toml", out=folder / "run")
    assert result.step == 3 and result.checkpoint == folder / "run" / "checkpoint.pt"
    assert result.metrics.is_file() and result.plot.is_file()
    return folder / "run"


def test_train_refuses_and_resumes(run_dir: Path) -> None:
    recipe = run_dir.parent / "tiny.toml"
    with pytest.raises(lf.LatticeflowError, match="already exists"):
        lf.train(recipe, out=run_dir)
    with pytest.raises(lf.LatticeflowError, match="load_recipe"):
        lf.train(lf.load_recipe(recipe), out=run_dir, steps=4)
    before = (run_dir / "checkpoint.pt").read_bytes()
    result = lf.train(recipe, out=run_dir, resume=True)  # already at step 3: nothing to do
    assert result.step == 3 and (run_dir / "checkpoint.pt").read_bytes() == before


def test_flow_samples(run_dir: Path) -> None:
    flow = lf.load_flow(run_dir)
    assert isinstance(flow, lf.TrainedFlow) and flow.step == 3 and flow.lattice == (4, 4)
    samples = flow.sample(50, seed=3)
    assert isinstance(samples, lf.FlowSamples)
    assert samples.x.shape == (50, 4, 4)
    assert samples.log_q.shape == samples.action.shape == (50,)
    assert torch.equal(samples.action, flow.action(samples.x).double())
    assert torch.equal(samples.log_weight, -samples.action - samples.log_q)
    assert 0 < samples.ess <= 1
    assert torch.equal(flow.sample(50, seed=3).x, samples.x)
    assert lf.load_flow(flow) is flow
    with pytest.raises(lf.LatticeflowError, match="already loaded"):
        lf.load_flow(flow, lattice="8x8")
    bigger = lf.load_flow(run_dir / "checkpoint.pt", lattice="8x8")
    assert bigger.sample(2, seed=0).x.shape == (2, 8, 8)
    with pytest.raises(lf.LatticeflowError, match="positive integer"):
        flow.sample(0)


def test_nmcmc_equals_the_command(run_dir: Path, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "api.h5", tmp_path / "cli.h5"
    ensemble = lf.nmcmc(lf.load_flow(run_dir), out=ours)     # n, seed, ... from [sampling]
    assert cli.main(["-q", "sample", str(run_dir), "--device", "cpu",
                     "--out", str(theirs)]) == 0
    same_file(ours, theirs)
    assert len(ensemble) == 40 and ensemble["configs"].shape == (40, 4, 4)
    assert ensemble.metadata.sampler == "nmcmc"
    same_rows(lf.nmcmc(run_dir, 40), ensemble)               # in memory, from the directory
    chains = lf.nmcmc(run_dir, 40, chains=2, chunk=20, seed=5)
    assert np.array_equal(chains["chain"], np.arange(40) % 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n must be a positive integer"),
    ({"batch_size": 0}, "batch_size"),
    ({"chains": 3}, "multiples of chains"),
    ({"seed": 2**63}, "seed"),
    ({"store_dtype": "float16"}, "float16"),
])
def test_nmcmc_bad_input(run_dir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(lf.LatticeflowError, match=match):
        lf.nmcmc(run_dir, **{"n": 40, **kwargs})


def test_u1_action_round_trip() -> None:
    assert isinstance(lf.load_action(U1_CARD), U1Wilson)
