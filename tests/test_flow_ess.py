"""analysis/flow_ess.py: ESS on fresh samples with own and lineage training time; bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from latticeflow.cli import main as latticeflow_main
from latticeflow.training.checkpoint import read_checkpoint

_SPEC = importlib.util.spec_from_file_location(
    "flow_ess_script", Path(__file__).parents[1] / "analysis" / "flow_ess.py")
flow_ess = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(flow_ess)

FLOW = '[flow]\nbase = "fourier"\ntransform = "spline"\nn_couplings = 2\nhidden = [2]\n'


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    for L, parent in ((4, None), (8, "small.toml")):
        name = "small.toml" if L == 4 else "large.toml"
        init = f'init_from = "{parent}"\n' if parent else ""
        (runs / name).write_text(
            f'action = {{theory = "phi4", m2 = -4.0, lam = 8.0}}\nlattice = [{L}, {L}]\n'
            f'device = "cpu"\n{init}{FLOW}[training]\nsteps = 3\nbatch_size = 8\n'
            f"ess_batch = 16\n")
    assert latticeflow_main(["-q", "train", str(runs / "large.toml")]) == 0
    return runs


def test_ess_and_lineage_time(lineage: Path, tmp_path: Path):
    out = tmp_path / "ess.json"
    assert flow_ess.main(["-q", str(lineage / "small"), str(lineage / "large"), "--n", "64",
                          "--batch", "16", "--json", str(out)]) == 0
    small, large = json.loads(out.read_text())
    own = {name: read_checkpoint(lineage / name / "checkpoint.pt")[0]["wall_time"]
           for name in ("small", "large")}
    assert small["training_s"] == small["lineage_training_s"] == pytest.approx(own["small"])
    assert large["lineage_training_s"] == pytest.approx(own["small"] + own["large"])
    assert large["lattice"] == [8, 8] and large["n"] == 64
    # The same number as the importance weights of 64 fresh draws with the script's seed.
    import latticeflow as lf
    flow = lf.load_flow(lineage / "large")
    g = torch.Generator().manual_seed(12345)
    log_w = []
    with torch.no_grad():
        for _ in range(4):
            x, log_q = flow.flow.sample(16, generator=g)
            log_w.append(-flow.action(x).double() - log_q.double())
    log_w = torch.cat(log_w)
    expected = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
                     / len(log_w))
    assert large["ess"] == pytest.approx(expected, rel=1e-9)


def test_bad_input_exits_2_and_keeps_files(lineage: Path, tmp_path: Path, capsys):
    assert flow_ess.main(["-q", str(tmp_path / "nowhere")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    existing = tmp_path / "ess.json"
    existing.write_text("keep")
    assert flow_ess.main(["-q", str(lineage / "small"), "--json", str(existing)]) == 2
    assert existing.read_text() == "keep"


def test_symmetrized_ess(lineage: Path, tmp_path: Path):
    out = tmp_path / "ess.json"
    assert flow_ess.main(["-q", str(lineage / "large"), "--n", "64", "--batch", "16",
                          "--diagonal-shifts", "2", "--z2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["symmetries"] == 4 and 0 < row["ess"] <= 1
    # the same number as the mixture's own draws with the script's seed
    import latticeflow as lf
    from latticeflow.flows.symmetrize import SymmetrizedFlow, diagonal_shifts
    flow = lf.load_flow(lineage / "large")
    mixed = SymmetrizedFlow(flow.flow, diagonal_shifts(2, 2, z2=True))
    g = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        parts = [mixed.sample(16, generator=g) for _ in range(4)]
    log_w = torch.cat([-flow.action(x).double() - log_q.double() for x, log_q in parts])
    expected = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
                     / len(log_w))
    assert row["ess"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("options", [["--diagonal-shifts", "0"], ["--z2"]])
def test_bad_symmetry_options_exit_2(lineage: Path, capsys, options):
    assert flow_ess.main(["-q", str(lineage / "small"), *options]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
