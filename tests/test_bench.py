"""``latticeflow bench`` smoke tests, the scaling fit, and the GPU-readiness options
(``--compile`` gives the eager results; TF32 switches are scoped)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from latticeflow import cli
from latticeflow.flows import build_flow
from latticeflow.flows.compile import compile_forward
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.studies.bench import fit_slope
from latticeflow.theories import Phi4
from latticeflow.training import tf32_mode

TINY = ["--theory", "phi4", "--batch", "4", "--repeats", "1", "--warmup", "0", "--couplings",
        "1", "--hidden", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_bench_estimators_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "est.json"
    assert cli.main(["bench", "estimators", *TINY, "--lattice", "4", "--estimator",
                     "reverse-standard", "reverse-fastpath", "--json", str(out)]) == 0
    assert "reverse-fastpath" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["estimator"] for r in rows] == ["reverse-standard", "reverse-fastpath"]
    assert all(r["seconds"] > 0 and r["memory_bytes"] > 0 for r in rows)
    before = out.read_bytes()   # an existing --json file is kept without --force
    assert cli.main(["bench", "estimators", *TINY, "--lattice", "4", "--json", str(out)]) == 2
    assert out.read_bytes() == before


def test_bench_scaling_smoke(tmp_path: Path, capsys) -> None:
    plot, out = tmp_path / "scaling.png", tmp_path / "scaling.json"
    assert cli.main(["bench", "scaling", *TINY, "--lattice", "4", "8", "--sampling-n", "8",
                     "--sampling-batch", "4", "--fit-range", "4", "8", "--plot", str(plot),
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cost per sample ∝ L^a" in text and "nmcmc" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.read_text())
    assert len(record["steps"]) == 2 * 4 and len(record["sampling"]) == 2
    assert {"reverse-standard B=4", "forward-fastpath B=4 memory", "nmcmc"} <= set(
        record["slopes"])
    assert all(math.isfinite(v) for v in record["slopes"].values())


def test_fit_slope() -> None:
    lattices = [8, 16, 32, 64]
    assert fit_slope(lattices, [3.0 * n**2 for n in lattices]) == pytest.approx(2.0)
    # only 16..64 count: a different cost at L = 8 does not change the slope
    assert fit_slope(lattices, [1.0, *(n**1.5 for n in lattices[1:])]) == pytest.approx(1.5)
    assert math.isnan(fit_slope([8, 16], [1.0, 2.0]))


def test_tf32_mode_is_scoped() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_mode(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with tf32_mode(False):
            assert not (torch.backends.cuda.matmul.allow_tf32
                        or torch.backends.cudnn.allow_tf32)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def _chains(compile_backend: str | None) -> dict[str, np.ndarray]:
    torch.manual_seed(3)
    flow = build_flow("phi4", (4, 4), {"n_couplings": 2, "hidden": [4]})
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    if compile_backend is not None:
        compile_forward(flow, 16, backend=compile_backend)
    sampler = FlowMetropolis(flow, Phi4(-1.0, 1.0), seed=5, batch_size=8, n_chains=2,
                             store_dtype=torch.float64)
    return sampler.advance(48)


@pytest.mark.parametrize("backend", [
    "aot_eager",   # Dynamo + AOTAutograd graphs run eagerly: the plumbing, in seconds
    pytest.param("inductor", marks=pytest.mark.slow),  # generated C++ kernels: ~1 min on CPU
])
def test_compiled_flow_samples_like_eager(backend: str) -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    eager = _chains(None)
    try:
        compiled = _chains(backend)
    except Exception as exc:  # no C++ compiler, unsupported platform, ...
        pytest.skip(f"torch.compile is not usable here: {exc}")
    np.testing.assert_array_equal(compiled["accepted"], eager["accepted"])
    np.testing.assert_array_equal(compiled["chain"], eager["chain"])
    for name in ("configs", "action", "log_q", "log_weight"):
        np.testing.assert_allclose(compiled[name], eager[name], rtol=1e-12, atol=1e-12,
                                   err_msg=name)
