"""Trainer: resume equivalence, init-from on a larger lattice, NaN guard, checkpoint refusal,
forward-KL data, and the ``latticeflow train`` command."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from latticeflow import cli, estimators
from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe, load_recipe
from latticeflow.statistics import ess
from latticeflow.training import (
    Trainer,
    TrainingDiverged,
    load_checkpoint,
    lr_factor,
    open_trainer,
    read_checkpoint,
    read_metrics,
)

PHI4_CARD = 'theory = "phi4"\nform = "standard"\nm2 = -4.0\nlam = 8.0\n'
FREE_CARD = 'theory = "phi4"\nform = "standard"\nm2 = 1.0\nlam = 0.0\n'
INTERACTING_CARD = 'theory = "phi4"\nform = "standard"\nm2 = 1.0\nlam = 1.0\n'
U1_CARD = 'theory = "u1"\nbeta = 2.0\n'
TINY = "[flow]\nn_couplings = 2\nhidden = [4]\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, and immune to oversubscription on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_recipe(tmp_path: Path, text: str, card: str = PHI4_CARD, name: str = "r",
                overrides: dict | None = None) -> Recipe:
    (tmp_path / f"{name}_card.toml").write_text(card)
    path = tmp_path / f"{name}.toml"
    path.write_text(f'action = "{name}_card.toml"\ndevice = "cpu"\n' + text)
    return load_recipe(path, overrides)


def params(flow: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in flow.state_dict().items()}


# ------------------------------------------------------------------------------ schedule


def test_lr_schedule(tmp_path: Path) -> None:
    config = make_recipe(tmp_path, 'lattice = [4, 4]\n[training]\nsteps = 12\nwarmup_steps = 2\n'
                                   'schedule = "cosine"\n').training
    factors = [lr_factor(i, config) for i in range(12)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[7] == pytest.approx(0.5)            # half-way through the decay
    assert all(a > b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert 0.0 < factors[-1] < 0.05


# ------------------------------------------------------------------------------ resume

RESUME_RECIPE = ('lattice = [4, 4]\ndtype = "float64"\nseed = 5\n' + TINY +
                 '[training]\nsteps = 6\nbatch_size = 16\nlr = 3e-3\nschedule = "cosine"\n'
                 'warmup_steps = 2\ngrad_clip = 50.0\ness_interval = 2\ness_batch = 32\n'
                 'checkpoint_interval = 2\n')


def test_resume_equals_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    """6 steps in one go == 3 steps, Ctrl-C (checkpoint of step 3), then --resume: bitwise."""
    recipe = make_recipe(tmp_path, RESUME_RECIPE)
    whole = open_trainer(recipe, tmp_path / "whole")
    whole.train()

    original = Trainer._train_step
    calls = {"n": 0}

    def interrupted_step(self: Trainer):
        calls["n"] += 1
        if calls["n"] == 3:   # Ctrl-C in the middle of step 3: it completes, then we stop
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        open_trainer(recipe, tmp_path / "split").train()
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert read_checkpoint(tmp_path / "split" / "checkpoint.pt")[0]["step"] == 3

    with pytest.raises(LatticeflowError, match="--resume"):
        open_trainer(recipe, tmp_path / "split")
    resumed = open_trainer(recipe, tmp_path / "split", resume=True)
    assert resumed.step == 3
    resumed.train()

    assert resumed.step == whole.step == 6
    for key, value in params(whole.flow).items():
        assert torch.equal(value, resumed.flow.state_dict()[key]), key
    a, b = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    m_whole = read_metrics(tmp_path / "whole" / "metrics.csv")
    m_split = read_metrics(tmp_path / "split" / "metrics.csv")
    for column in ("step", "loss", "ess", "logw_std", "lr", "skipped_steps"):
        np.testing.assert_array_equal(m_whole[column], m_split[column], err_msg=column)
    assert not np.allclose(m_whole["loss"][0], m_whole["loss"][-1])  # it did train


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, RESUME_RECIPE, overrides={"training.steps": 1})
    open_trainer(recipe, tmp_path / "run").train()
    changed = make_recipe(tmp_path, RESUME_RECIPE, overrides={"training.lr": 1e-2})
    with pytest.raises(LatticeflowError, match=r"training\.lr"):
        open_trainer(changed, tmp_path / "run", resume=True)
    longer = make_recipe(tmp_path, RESUME_RECIPE, overrides={"training.steps": 2})
    assert open_trainer(longer, tmp_path / "run", resume=True).train().step == 2


# ------------------------------------------------------------------------------ init-from


def test_init_from_smaller_lattice(tmp_path: Path) -> None:
    """Weights trained at L=4 give a useful flow at L=8, far better than a fresh one.

    Target: φ⁴ at m² = 1, λ = 1 (symmetric phase, short correlation length, so a flow of local
    translation-invariant couplings transfers). The fresh (identity) flow's log weights spread
    over tens of units at L=8: one sample of 2048 carries all the weight, ESS ≈ 1/2048. 150 steps
    at L=4 reach ESS ≈ 0.75 there; at L=8 (4× the volume) that becomes ≈ 0.35 (seen: 0.37). We
    require > 0.1, i.e. > 200× the fresh flow, leaving a wide margin for platform round-off.
    """
    small = make_recipe(tmp_path, 'lattice = [4, 4]\nseed = 1\n[flow]\nn_couplings = 4\n'
                                  'hidden = [8]\n[training]\nsteps = 150\nbatch_size = 64\n'
                                  'lr = 5e-3\ness_interval = 150\ness_batch = 1024\n',
                        card=INTERACTING_CARD, name="small")
    result = open_trainer(small, tmp_path / "small").train()
    assert result.ess > 0.4

    big = make_recipe(tmp_path, 'lattice = [8, 8]\nseed = 2\n[flow]\nn_couplings = 4\n'
                                'hidden = [8]\n[training]\nsteps = 0\ness_batch = 2048\n',
                      card=INTERACTING_CARD, name="big")
    fresh = Trainer(big, tmp_path / "fresh").measure_ess()
    transferred = open_trainer(big, tmp_path / "big", init_from=tmp_path / "small")
    ess_big = transferred.measure_ess()
    assert fresh < 0.01 and ess_big > 0.1, (ess_big, fresh)

    loaded = load_checkpoint(tmp_path / "small", device="cpu", lattice=(8, 8))
    assert loaded.lattice == (8, 8) and loaded.step == 150 and not loaded.flow.training
    assert loaded.last_ess == pytest.approx(result.ess)
    for key, value in loaded.flow.state_dict().items():
        assert torch.equal(value, transferred.flow.state_dict()[key])
    with torch.no_grad():
        x, log_q = loaded.flow.sample(2048, torch.Generator().manual_seed(0))
        assert ess((-loaded.action(x) - log_q).numpy()) > 0.1


def test_refuses_mismatched_checkpoints(tmp_path: Path) -> None:
    # float64 = the tests' default dtype (ncp.py builds a constant in the default dtype)
    base = 'lattice = [4, 4]\ndtype = "float64"\n[training]\nsteps = 0\ness_batch = 8\n'
    make_u1 = make_recipe(tmp_path, base + TINY + "n_mixture = 2\n", card=U1_CARD, name="u1")
    open_trainer(make_u1, tmp_path / "u1").train()
    phi4 = make_recipe(tmp_path, base + TINY, name="phi4")
    with pytest.raises(LatticeflowError, match="u1 flow"):
        open_trainer(phi4, tmp_path / "a", init_from=tmp_path / "u1")

    open_trainer(phi4, tmp_path / "phi4").train()
    wider = make_recipe(tmp_path, base + "[flow]\nn_couplings = 2\nhidden = [6]\n", name="w")
    with pytest.raises(LatticeflowError, match="architecture differs.*hidden"):
        open_trainer(wider, tmp_path / "b", init_from=tmp_path / "phi4" / "checkpoint.pt")

    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"model": {}}, tmp_path / "other.pt")
    for bad in ("junk.pt", "other.pt"):
        with pytest.raises(LatticeflowError, match="not a latticeflow checkpoint"):
            load_checkpoint(tmp_path / bad)
        with pytest.raises(LatticeflowError, match="not a latticeflow checkpoint"):
            open_trainer(phi4, tmp_path / "c", init_from=tmp_path / bad)
    with pytest.raises(LatticeflowError, match="divisible by 4"):
        load_checkpoint(tmp_path / "u1", lattice=(6, 8))


# ------------------------------------------------------------------------------ NaN guard

NAN_RECIPE = ('lattice = [4, 4]\n' + TINY + '[training]\nsteps = 8\nbatch_size = 16\n'
              'ess_interval = 4\ness_batch = 32\ncheckpoint_interval = 2\nmax_bad_steps = 3\n')


def poisoned_estimator(bad_calls: set[int], gradient_only: bool = False):
    """reverse-fastpath, with a NaN surrogate (or only NaN gradients) on the given calls."""
    real = estimators.get_estimator("reverse-fastpath")
    calls = {"n": 0}

    def estimator(flow, action, batch):
        calls["n"] += 1
        out = real(flow, action, batch)
        if calls["n"] in bad_calls:
            if gradient_only:
                out.surrogate.register_hook(lambda g: g * math.nan)
            else:
                out.surrogate = out.surrogate * math.nan
        return out

    return lambda name: estimator


@pytest.mark.parametrize("gradient_only", [False, True])
def test_non_finite_steps_are_skipped(tmp_path: Path, monkeypatch, gradient_only: bool) -> None:
    monkeypatch.setattr("latticeflow.training.trainer.get_estimator",
                        poisoned_estimator({3, 4}, gradient_only))
    trainer = open_trainer(make_recipe(tmp_path, NAN_RECIPE), tmp_path / "run")
    result = trainer.train()
    assert result.step == 8 and result.skipped_steps == 2
    state, _ = read_checkpoint(result.checkpoint)
    assert state["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    metrics = read_metrics(result.metrics)
    assert list(metrics["skipped_steps"]) == [0, 0, 1, 2, 2, 2, 2, 2]
    assert np.isnan(metrics["loss"][2:4]).all() and np.isfinite(metrics["loss"][4:]).all()


def test_repeated_failures_stop_and_keep_last_good_checkpoint(tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setattr("latticeflow.training.trainer.get_estimator",
                        poisoned_estimator(set(range(5, 100))))
    trainer = open_trainer(make_recipe(tmp_path, NAN_RECIPE), tmp_path / "run")
    before = {}

    original_save = Trainer.save_checkpoint

    def recording_save(self: Trainer) -> None:
        original_save(self)
        before.update(step=self.step, bytes=self.checkpoint_file.read_bytes())

    monkeypatch.setattr(Trainer, "save_checkpoint", recording_save)
    with pytest.raises(TrainingDiverged, match="3 consecutive.*last good checkpoint") as err:
        trainer.train()
    assert isinstance(err.value, LatticeflowError)
    assert before["step"] == 4                       # steps 5, 6, 7 failed; 6 was not saved
    assert trainer.checkpoint_file.read_bytes() == before["bytes"]
    state, _ = read_checkpoint(trainer.checkpoint_file)
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["model"].values())


# ------------------------------------------------------------------------------ forward KL


def free_field_samples(n: int, lattice: tuple[int, int], m2: float, seed: int) -> np.ndarray:
    """Exact samples of S = Σ[Σ_μ (φ(x+μ̂) − φ(x))² + m² φ²] = ½ φᵀ K φ (Gaussian)."""
    size = lattice[0] * lattice[1]
    index = np.arange(size).reshape(lattice)
    k = np.eye(size) * 2 * (4 + m2)
    for axis in (0, 1):
        neighbour = np.roll(index, -1, axis).ravel()
        k[index.ravel(), neighbour] -= 2
        k[neighbour, index.ravel()] -= 2
    chol = np.linalg.cholesky(k)
    z = np.random.default_rng(seed).standard_normal((size, n))
    return np.linalg.solve(chol.T, z).T.reshape(n, *lattice)


def write_ensemble(path: Path, configs: np.ndarray, card: dict, lattice: list[int]) -> None:
    """An HMC ensemble in the DESIGN §6 schema, written with plain h5py."""
    with h5py.File(path, "w") as f:
        attrs = {"format": "latticeflow-ensemble", "format_version": 1, "theory": card["theory"],
                 "action_params": json.dumps(card), "lattice": np.array(lattice),
                 "sampler": "hmc", "seed": 0, "created": "2024-01-01T00:00:00+00:00",
                 "latticeflow_version": "test", "checkpoint_sha256": "",
                 "sampler_params": "{}", "n_complete": len(configs)}
        f.attrs.update(attrs)
        f.create_dataset("configs", data=configs, chunks=(64, *configs.shape[1:]),
                         compression="gzip", maxshape=(None, *configs.shape[1:]))
        for name, dtype in (("action", float), ("accepted", bool), ("delta_H", float)):
            f.create_dataset(name, data=np.zeros(len(configs), dtype=dtype), maxshape=(None,))


def test_forward_kl_training_from_ensemble(tmp_path: Path) -> None:
    card = {"theory": "phi4", "form": "standard", "m2": 1.0, "lam": 0.0}
    write_ensemble(tmp_path / "free.h5", free_field_samples(2048, (4, 4), 1.0, 0), card, [4, 4])
    text = ('lattice = [4, 4]\n[flow]\nn_couplings = 4\nhidden = [8]\n[training]\n'
            'estimator = "forward-standard"\ndata = "free.h5"\nsteps = 120\nbatch_size = 64\n'
            'lr = 1e-2\ness_interval = 120\ness_batch = 1024\nreverse_weight = 0.1\n')
    trainer = open_trainer(make_recipe(tmp_path, text, card=FREE_CARD), tmp_path / "run")
    assert trainer.data.shape == (2048, 4, 4) and trainer.data.dtype == torch.float32
    initial = trainer.measure_ess()
    result = trainer.train()
    loss = read_metrics(result.metrics)["loss"]
    assert loss[-20:].mean() < loss[:20].mean() - 1.0   # the mixed KL objective went down
    assert result.ess > max(0.5, initial + 0.2), (initial, result.ess)


def test_forward_kl_data_must_match_recipe(tmp_path: Path) -> None:
    card = {"theory": "phi4", "form": "standard", "m2": 1.0, "lam": 0.0}
    write_ensemble(tmp_path / "free.h5", free_field_samples(16, (4, 4), 1.0, 0), card, [4, 4])
    text = '[training]\nestimator = "forward-fastpath"\ndata = "free.h5"\n' + TINY
    with pytest.raises(LatticeflowError, match=r"does not match.*lattice \[4, 4\]"):
        Trainer(make_recipe(tmp_path, "lattice = [8, 8]\n" + text, card=FREE_CARD), tmp_path)
    with pytest.raises(LatticeflowError, match="does not match.*action"):
        Trainer(make_recipe(tmp_path, "lattice = [4, 4]\n" + text, card=PHI4_CARD), tmp_path)


# ------------------------------------------------------------------------------ the CLI


def latticeflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "latticeflow.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_train(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "card.toml").write_text(PHI4_CARD)
    (tmp_path / "tiny.toml").write_text(
        'action = "card.toml"\nlattice = [4, 4]\ndevice = "cpu"\n' + TINY +
        '[training]\nsteps = 3\nbatch_size = 8\ness_interval = 2\ness_batch = 16\n')
    run = latticeflow("train", "tiny.toml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "tiny"
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "metrics.csv", "training.png"}
    assert "final ESS" in run.stderr and str(out / "checkpoint.pt") in run.stderr
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[0]["ess"] == ""
    assert rows[1]["ess"] != "" and rows[2]["ess"] != ""

    stamp = (out / "checkpoint.pt").read_bytes()
    again = latticeflow("train", "tiny.toml", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (out / "checkpoint.pt").read_bytes() == stamp

    # in-process (interpreter start-up is slow): --resume, --force, --help
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "tiny.toml", "--resume", "--steps", "5"]) == 0
    assert read_checkpoint(out / "checkpoint.pt")[0]["step"] == 5
    assert len(read_metrics(out / "metrics.csv")["step"]) == 5
    assert cli.main(["train", "tiny.toml", "--force", "--steps", "1"]) == 0
    assert read_checkpoint(out / "checkpoint.pt")[0]["step"] == 1
    assert len(read_metrics(out / "metrics.csv")["step"]) == 1
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "latticeflow train runs/quickstart.toml" in capsys.readouterr().out
