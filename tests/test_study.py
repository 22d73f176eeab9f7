"""The estimator study: gradient-variance and forward-ESS definitions, and a smoke run of
``analysis/estimator_study.py --quick`` with tiny budgets."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from flow_helpers import FlowDensityAction, random_flow

from latticeflow.estimators import direction
from latticeflow.studies import estimators as study

ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("analysis_script_estimator_study",
                                                  ROOT / "analysis" / "estimator_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batches(flow, estimator: str, target_flow, n: int = 4, size: int = 16) -> list:
    if direction(estimator) == "reverse":
        return [flow.sample_prior(size) for _ in range(n)]
    with torch.no_grad():
        return [target_flow.sample(size)[0] for _ in range(n)]


@pytest.mark.parametrize("theory", ["phi4", "u1"])
@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_path_gradient_variance_vanishes_at_exact_optimum(theory, kind):
    """q = p exactly (S = −log q* of a frozen copy): the path gradient is zero on every batch,
    the standard one is not."""
    flow = random_flow(theory)
    target = FlowDensityAction(copy.deepcopy(flow))
    path_name, standard_name = f"{kind}-fastpath", f"{kind}-standard"
    batches = _batches(flow, path_name, target.flow)
    path = study.gradient_variance(flow, target, path_name, batches)
    standard = study.gradient_variance(flow, target, standard_name, batches)
    assert standard.variance > 1e-4
    assert path.variance < 1e-16 * standard.variance
    assert path.mean_norm2 < 1e-16 * max(standard.mean_norm2, standard.variance)


def test_gradient_variance_is_the_unbiased_total_variance():
    flow = random_flow("phi4")
    action = FlowDensityAction(random_flow("phi4", seed=1))
    batches = [flow.sample_prior(8) for _ in range(2)]
    g1, g2 = (study.flat_gradient(flow, action, "reverse-standard", b) for b in batches)
    result = study.gradient_variance(flow, action, "reverse-standard", batches)
    assert result.variance == pytest.approx(float((g1 - g2).pow(2).sum() / 2), rel=1e-10)
    assert result.mean_norm2 == pytest.approx(float(((g1 + g2) / 2).pow(2).sum()), rel=1e-10)
    assert all(p.grad is None for p in flow.parameters())
    with pytest.raises(ValueError, match="at least 2"):
        study.gradient_variance(flow, action, "reverse-standard", batches[:1])


def test_forward_ess():
    assert study.forward_ess(np.zeros(7)) == pytest.approx(1.0)
    log_w = np.log([1.0, 4.0])
    assert study.forward_ess(log_w) == pytest.approx(4 / (5 * 1.25))
    assert study.forward_ess(log_w + 700.0) == pytest.approx(0.64)


def _finite_numbers(value) -> bool:
    if isinstance(value, dict):
        return all(_finite_numbers(v) for k, v in value.items() if k != "std")
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_study_smoke(tmp_path, capsys, single_thread):
    """--quick with tiny budgets: exit 0, every estimator in both tables, finite numbers, PNGs."""
    out = tmp_path / "study"
    code = _load_script().main(["--quick", "--out", str(out), "--seeds", "2", "--budget", "0.5",
                                "--forward-seeds", "1", "--forward-budget", "0.3"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    reverse, forward = data["summary"]["reverse"], data["summary"]["forward"]
    for theory in study.THEORY_CARDS:
        assert {r["estimator"] for r in reverse if r["theory"] == theory} == set(
            study.REVERSE_ESTIMATORS)
        for n_train in study.QUICK.forward.train_sizes:
            assert {r["estimator"] for r in forward if r["theory"] == theory
                    and r["n_train"] == n_train} == set(study.FORWARD_ESTIMATORS)
    for row in reverse + forward:
        assert row["seeds"] == (2 if row in reverse else 1)
        assert _finite_numbers(row), row
        assert 0 < row["ess_final"]["mean"] <= 1
    for row in forward:
        assert 0 <= row["forward_ess_final"]["mean"] <= 1
    table = (out / "results.md").read_text()
    for name in study.REVERSE_ESTIMATORS + study.FORWARD_ESTIMATORS:
        assert f"| {name} |" in table
    assert "nan" not in table.lower()
    for png in ("reverse_ess_vs_time", "reverse_ess_vs_step", "gradient_variance",
                "forward_kl"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--forward-seeds", "-1"], "--forward-seeds must be >= 1"),
    (["--budget", "-1"], "--budget must be a positive"),
    (["--theories", "phi3"], "unknown theory phi3"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = _load_script().main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err
