"""The library on CUDA gives the CPU's results: flows, estimators, HMC, NMCMC, training, `run`.

The device is ``LATTICEFLOW_TEST_DEVICE`` (default ``cuda``); every test is skipped when that
device is CUDA and none is available. ``LATTICEFLOW_TEST_DEVICE=cpu`` runs the same checks
CPU-against-CPU, which is how the test logic itself is checked on machines without a GPU.

Tolerances: float64 comparisons use ``RTOL = 1e-9`` relative to the largest magnitude of the CPU
result. CUDA's kernels differ from the CPU's only in round-off (summation order of reductions,
convolutions and FFTs; transcendental functions within a few ulps; the NCP root finder stops
within ~2e-14), which after a few layers, a leapfrog trajectory or a backward pass stays near
1e-13; a device bug (a mask, buffer or generator left on the wrong device, a wrong branch) is an
O(1e-3..1) error. 1e-9 leaves four orders of magnitude of headroom on both sides.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flow_helpers import ARCHS, random_flow, theory_of, wrap_difference

import latticeflow as lf
from latticeflow import cli
from latticeflow.estimators import ESTIMATORS, direction, get_estimator
from latticeflow.observables import magnetization, plaquette_mean, topological_charge
from latticeflow.samplers.hmc import INTEGRATORS, HMCConfig, HMCSampler, kinetic_energy
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.theories import Phi4, U1Wilson
from latticeflow.training import read_checkpoint, read_metrics

DEVICE = os.environ.get("LATTICEFLOW_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available(),
    reason=f"device {DEVICE!r} needs CUDA, which is not available here "
           f"(set LATTICEFLOW_TEST_DEVICE=cpu to run these checks on the CPU)")

RTOL = 1e-9
ROOT = Path(__file__).resolve().parents[1]
CARDS = {"phi4": ROOT / "actions" / "phi4_m2-4_lam8.toml", "u1": ROOT / "actions" / "u1_beta2.toml"}
ACTIONS = {"phi4": Phi4(-1.0, 1.0), "u1": U1Wilson(1.5)}


def same(got: torch.Tensor, want: torch.Tensor, angles: bool = False,
         scale: float | None = None) -> None:
    """``got`` (on DEVICE) equals ``want`` (CPU) to RTOL times the largest |want| (or ``scale``,
    at least 1); ``angles``: compared modulo 2π (U(1) links near the 0/2π cut)."""
    assert got.device.type == torch.device(DEVICE).type
    a, b = got.detach().cpu(), want.detach()
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = wrap_difference(a, b) if angles else a - b
    bound = RTOL * max(1.0, float(b.abs().max()) if scale is None else scale)
    assert float(diff.abs().max()) <= bound, (float(diff.abs().max()), bound)


def on_device(flow):
    return copy.deepcopy(flow).to(DEVICE)


# ------------------------------------------------------------------------ 1. flows
@pytest.mark.parametrize("variant", sorted(ARCHS))
def test_flow_matches_cpu(variant: str) -> None:
    cpu = random_flow(variant, (8, 8))
    dev = on_device(cpu)
    assert all(t.device.type == torch.device(DEVICE).type
               for t in [*dev.parameters(), *dev.buffers()])
    angles = theory_of(variant) == "u1"
    z = cpu.sample_prior(16)
    x, log_q = cpu(z)
    x_dev, log_q_dev = dev(z.to(DEVICE))
    same(x_dev, x, angles)
    same(log_q_dev, log_q)
    z_back, log_q_back = dev.inverse(x_dev)       # round trip on the device
    same(z_back, z, angles)
    same(log_q_back, log_q)
    x_s, log_q_s, score = cpu.forward_and_score(z)
    x_s_dev, log_q_s_dev, score_dev = dev.forward_and_score(z.to(DEVICE))
    same(x_s_dev, x_s, angles)
    same(log_q_s_dev, log_q_s)
    same(score_dev, score)
    assert dev.sample(4)[0].device.type == torch.device(DEVICE).type   # the prior samples there


# ------------------------------------------------------------------------ 2. estimators
def _gradient(flow, name, action, batch):
    flow.zero_grad()
    out = get_estimator(name)(flow, action, batch)
    out.surrogate.backward()
    return torch.cat([p.grad.flatten() for p in flow.parameters()]), out


@pytest.mark.parametrize("variant", sorted(ARCHS))
@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_gradients_match_cpu(variant: str, name: str) -> None:
    """Every estimator's parameter gradient, for every flow variant of φ⁴ and U(1)."""
    cpu = random_flow(variant, (8, 8))
    dev = on_device(cpu)
    action = ACTIONS[theory_of(variant)]
    if direction(name) == "reverse":
        batch = cpu.sample_prior(16)
    else:   # target data: samples of another flow
        with torch.no_grad():
            batch = random_flow(variant, (8, 8), seed=7).sample(16)[0]
    grad, out = _gradient(cpu, name, action, batch)
    grad_dev, out_dev = _gradient(dev, name, action, batch.to(DEVICE))
    assert grad.norm() > 0
    same(grad_dev, grad)
    same(out_dev.objective, out.objective)
    same(out_dev.log_weight, out.log_weight)


# ------------------------------------------------------------------------ 3. HMC
@pytest.mark.parametrize("theory", ["phi4", "u1"])
@pytest.mark.parametrize("integrator", sorted(INTEGRATORS))
def test_hmc_trajectory_matches_cpu(theory: str, integrator: str) -> None:
    action = ACTIONS[theory]
    shape = (4, *action.field_shape((8, 8)))
    x0 = torch.randn(shape) if theory == "phi4" else 2 * math.pi * torch.rand(shape)
    p0 = torch.randn(shape)
    # Per-chain step sizes, as HMCSampler's jitter passes them (a tensor on the device).
    eps = 0.05 * (1 + 0.2 * (2 * torch.rand((4, *[1] * (len(shape) - 1))) - 1))

    def trajectory(device):
        x, p = x0.to(device), p0.to(device)
        h0 = action(x) + kinetic_energy(p)
        x1, p1 = INTEGRATORS[integrator](x, p, action.force, eps.to(device), 20)
        return x1, p1, action(x1) + kinetic_energy(p1) - h0, h0

    x1, p1, dh, h0 = trajectory("cpu")
    x1_dev, p1_dev, dh_dev, _ = trajectory(DEVICE)
    same(x1_dev, x1)
    same(p1_dev, p1)
    same(dh_dev, dh, scale=float(h0.abs().max()))   # ΔH: a difference of two O(H) numbers
    assert (dh.abs() < 0.1 * h0.abs()).all()        # a sane trajectory, not a blow-up


@pytest.mark.parametrize("theory", ["phi4", "u1"])
def test_hmc_sampler_runs_on_device(theory: str) -> None:
    config = HMCConfig(step_size=0.1, n_chains=3, n_therm=5, target_accept=0.8,
                       device=DEVICE)
    sampler = HMCSampler(ACTIONS[theory], (8, 8), config, seed=3)
    rows = sampler.advance(12)
    assert sampler.configs.device.type == torch.device(DEVICE).type
    assert all(np.isfinite(rows[k]).all() for k in ("configs", "action", "delta_H"))
    assert 0.0 <= sampler.acceptance_rate <= 1.0
    if theory == "u1":
        assert ((rows["configs"] >= 0) & (rows["configs"] < 2 * math.pi)).all()


# ------------------------------------------------------------------------ 4. NMCMC
def _fed_sampler(flow, action, z, log_u, chains):
    """A FlowMetropolis whose next proposals are T(z) computed on the flow's own device, with
    the uniform draws ``log_u``: fed through the resume state's pending proposals."""
    sampler = FlowMetropolis(flow, action, seed=0, batch_size=len(z) // chains, n_chains=chains,
                             store_dtype=torch.float64)
    with torch.no_grad():
        x, log_q = flow(z.to(flow.device))
    state = sampler.state_dict()     # the generator state of this device's generator
    state.update({"pending_x": x.cpu().numpy(), "pending_log_q": log_q.cpu().numpy(),
                  "pending_action": action(x).cpu().numpy(), "pending_log_u": log_u.numpy()})
    sampler.load_state_dict(state)
    return sampler


@pytest.mark.parametrize("theory", ["phi4", "u1"])
def test_nmcmc_accepts_like_cpu(theory: str) -> None:
    """Same proposals (up to round-off): the same accept decisions and rows. A decision could
    only differ if some log u fell within ~1e-13 of its threshold: probability ~1e-11."""
    cpu = random_flow(theory, (8, 8), std=0.05)
    action = ACTIONS[theory]
    z = cpu.sample_prior(64)
    log_u = torch.log(torch.rand(64, dtype=torch.float64))
    rows = _fed_sampler(cpu, action, z, log_u, 2).advance(64)
    rows_dev = _fed_sampler(on_device(cpu), action, z, log_u, 2).advance(64)
    assert 0 < rows["accepted"][2:].sum() < 62     # both outcomes occur
    np.testing.assert_array_equal(rows_dev["accepted"], rows["accepted"])
    for key in ("action", "log_q", "log_weight"):
        same(torch.from_numpy(rows_dev[key]).to(DEVICE), torch.from_numpy(rows[key]))


@pytest.mark.parametrize("theory", ["phi4", "u1"])
def test_nmcmc_chain_on_device(theory: str) -> None:
    flow = on_device(random_flow(theory, (8, 8), std=0.05))
    sampler = FlowMetropolis(flow, ACTIONS[theory], seed=1, batch_size=32, n_chains=2)
    rows = sampler.advance(96)      # three device batches
    assert 0.0 <= sampler.acceptance_rate <= 1.0
    assert all(np.isfinite(rows[k]).all() for k in ("configs", "action", "log_q", "log_weight"))
    configs = torch.from_numpy(rows["configs"]).double()
    observables = ([magnetization(configs)] if theory == "phi4"
                   else [plaquette_mean(configs), topological_charge(configs)])
    assert all(torch.isfinite(o).all() for o in observables)
    assert 0 < sampler.attributes()["proposal_ess"] <= 1


# ------------------------------------------------------------------------ 5, 6. runs
def write_recipe(path: Path, recipe: dict) -> Path:
    """A recipe file from a dict of top-level keys and tables (JSON literals are TOML here)."""
    top = [f"{k} = {json.dumps(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
              for k, v in recipe.items() if isinstance(v, dict)]
    path.write_text("\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n")
    return path


def test_run_quickstart_end_to_end(tmp_path: Path) -> None:
    recipe = tomllib.loads((ROOT / "runs" / "quickstart.toml").read_text())
    recipe.update(action=str(CARDS["phi4"]), dtype="float32")
    recipe["training"].update(batch_size=16, steps=6, warmup_steps=2, ess_interval=3,
                              ess_batch=64, checkpoint_interval=3)
    recipe["sampling"].update(n=300, batch_size=64, chunk=100)
    recipe["analysis"].update(thermalization=20)
    path = write_recipe(tmp_path / "quickstart.toml", recipe)
    run_dir = tmp_path / "run"
    assert cli.main(["-q", "run", str(path), "--device", DEVICE, "--out", str(run_dir)]) == 0
    state, _ = read_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == 6 and state["dtype"] == "float32"
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    ensemble = lf.read_ensemble(run_dir / "nmcmc.h5")
    assert len(ensemble) == 300 and ensemble["configs"].dtype == np.float32
    assert np.isfinite(ensemble["log_weight"]).all()
    analysis = run_dir / "analysis"
    for name in ("observables.json", "observables.txt"):
        assert (analysis / name).stat().st_size > 0, name
    assert list(analysis.glob("*.png"))
    json.loads((analysis / "observables.json").read_text())


@pytest.mark.parametrize(("theory", "size"), [("phi4", 16), ("u1", 8)])
def test_float32_training_on_device(tmp_path: Path, theory: str, size: int) -> None:
    """20 reverse-fastpath steps in float32: finite loss, finite weights, no skipped step."""
    path = write_recipe(tmp_path / f"{theory}.toml", {
        "action": str(CARDS[theory]), "lattice": [size, size], "dtype": "float32",
        "training": {"estimator": "reverse-fastpath", "batch_size": 32, "steps": 20,
                     "lr": 1e-3, "ess_interval": 10, "ess_batch": 64,
                     "checkpoint_interval": 10}})
    result = lf.train(path, tmp_path / "run", device=DEVICE)
    assert result.step == 20 and result.skipped_steps == 0
    assert result.ess is not None and 0 < result.ess <= 1
    metrics = read_metrics(result.metrics)
    assert len(metrics["loss"]) == 20 and np.isfinite(metrics["loss"]).all()
    state, _ = read_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    flow = lf.load_flow(tmp_path / "run", device=DEVICE)
    assert flow.flow.device.type == torch.device(DEVICE).type
    assert flow.flow.dtype == torch.float32
    samples = flow.sample(8, seed=0)
    assert torch.isfinite(samples.log_q).all() and torch.isfinite(samples.action).all()
