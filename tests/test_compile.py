"""Compiled couplings (``[training] compile``) give eager's estimators, gradients and checkpoints.

The default run uses the ``aot_eager`` backend: Dynamo capture and AOTAutograd's joint graphs,
which is where the score recursion's per-layer VJP meets compiled code, run without code
generation (seconds). ``-m slow`` adds Inductor's generated C++ kernels (minutes on this CPU).
Float64 flows, so that "equal" means equal to round-off of reordered float64 sums (1e-9).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latticeflow.estimators import ESTIMATORS, direction, get_estimator
from latticeflow.flows.compile import compile_couplings, is_compiled
from latticeflow.theories import Phi4, U1Wilson
from tests.flow_helpers import random_flow

ACTIONS = {"phi4": Phi4(-1.0, 1.5), "u1": U1Wilson(1.5)}
BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


def _gradients(flow, theory: str, name: str, batch: torch.Tensor):
    flow.zero_grad(set_to_none=True)
    out = get_estimator(name)(flow, ACTIONS[theory], batch)
    out.surrogate.backward()
    grads = [p.grad.clone() for p in flow.parameters()]
    return out, grads


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.mark.parametrize("theory", ["phi4", "u1"])
def test_compiled_estimators_equal_eager(theory: str, backend: str) -> None:
    eager = random_flow(theory)
    compiled = compile_couplings(random_flow(theory), backend=backend)
    assert is_compiled(compiled) and not is_compiled(eager)
    torch.manual_seed(11)
    z = eager.sample_prior(6)
    with torch.no_grad():
        x = eager(z)[0]
    for name in ESTIMATORS:
        batch = z if direction(name) == "reverse" else x
        out_e, grads_e = _gradients(eager, theory, name, batch)
        out_c, grads_c = _gradients(compiled, theory, name, batch)
        for field in ("surrogate", "objective", "log_weight", "log_q"):
            torch.testing.assert_close(getattr(out_c, field), getattr(out_e, field),
                                       rtol=1e-9, atol=1e-9, msg=f"{name}: {field}")
        for g_c, g_e in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-9, atol=1e-9, msg=f"{name}: gradient")


@pytest.mark.parametrize("theory", ["phi4", "u1"])
def test_compiled_checkpoints_load_eager_and_back(theory: str) -> None:
    compiled = compile_couplings(random_flow(theory, seed=1), backend="aot_eager")
    eager = random_flow(theory, seed=2)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    eager.load_state_dict(compiled.state_dict())
    z = eager.sample_prior(4)
    torch.testing.assert_close(eager(z)[1], compiled(z)[1], rtol=1e-12, atol=1e-12)
    back = compile_couplings(random_flow(theory, seed=3), backend="aot_eager")
    back.load_state_dict(eager.state_dict())
    torch.testing.assert_close(back(z)[1], eager(z)[1], rtol=1e-12, atol=1e-12)


def test_compile_is_idempotent() -> None:
    flow = compile_couplings(random_flow("phi4"), backend="aot_eager")
    first = [vars(c)["condition"] for c in flow.couplings]
    compile_couplings(flow, backend="aot_eager")
    assert [vars(c)["condition"] for c in flow.couplings] == first


# ------------------------------------------------------------------------------ training

RECIPE = ('lattice = [4, 4]\ndtype = "float64"\nseed = 3\ndevice = "cpu"\n'
          '[flow]\nn_couplings = 2\nhidden = [4]\n'
          '[training]\nsteps = 4\nbatch_size = 8\nlr = 3e-3\ness_interval = 2\ness_batch = 12\n'
          'checkpoint_interval = 2\n')


def _train(tmp_path, name: str, compile: bool, steps: int = 4, resume: bool = False):
    from latticeflow.config import load_recipe
    from latticeflow.training import open_trainer

    (tmp_path / "card.toml").write_text('theory = "phi4"\nm2 = -4.0\nlam = 8.0\n')
    path = tmp_path / f"{name}.toml"
    path.write_text('action = "card.toml"\n' + RECIPE)
    recipe = load_recipe(path, {"training.compile": compile, "training.steps": steps})
    trainer = open_trainer(recipe, tmp_path / name, resume=resume)
    trainer.train()
    return trainer


@pytest.fixture
def aot_eager_training(monkeypatch):
    """Trainers compile with ``aot_eager`` (seconds, not Inductor's minutes)."""
    from latticeflow.training import trainer

    monkeypatch.setattr(trainer, "compile_couplings",
                        lambda flow: compile_couplings(flow, backend="aot_eager"))


def test_compiled_training_equals_eager_and_checkpoints_cross(tmp_path, aot_eager_training
                                                              ) -> None:
    from latticeflow.training import load_checkpoint, read_metrics

    eager = _train(tmp_path, "eager", compile=False)
    compiled = _train(tmp_path, "compiled", compile=True)
    assert is_compiled(compiled.flow) and not is_compiled(eager.flow)
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    assert eager.compile_seconds is None
    for (key, a), b in zip(compiled.flow.state_dict().items(),
                           eager.flow.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=key)
    # The throw-away compile step touched no training stream: the ESS and losses agree too.
    m_e, m_c = read_metrics(tmp_path / "eager/metrics.csv"), read_metrics(
        tmp_path / "compiled/metrics.csv")
    np.testing.assert_allclose(m_c["loss"], m_e["loss"], rtol=1e-9)
    np.testing.assert_allclose(m_c["ess"], m_e["ess"], rtol=1e-9)
    # A compiled run's checkpoint loads eager; an eager run resumes compiled and back.
    loaded = load_checkpoint(tmp_path / "compiled")
    assert not is_compiled(loaded.flow)
    z = loaded.flow.sample_prior(5)
    torch.testing.assert_close(loaded.flow(z)[1], compiled.flow(z)[1], rtol=1e-12, atol=1e-12)
    resumed = _train(tmp_path, "eager", compile=True, steps=6, resume=True)
    assert is_compiled(resumed.flow) and resumed.step == 6
    back = _train(tmp_path, "eager", compile=False, steps=8, resume=True)
    assert not is_compiled(back.flow) and back.step == 8
