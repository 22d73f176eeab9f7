"""analysis/phi4_ablation.py: a tiny equal-budget run, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from latticeflow.cli import main
from latticeflow.studies import ablation
from latticeflow.theories import Phi4

_SPEC = importlib.util.spec_from_file_location(
    "ablation_script", Path(__file__).parents[1] / "analysis" / "phi4_ablation.py")
ablation_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ablation_script)

ROOT = Path(__file__).parents[1]


def test_tiny_run_writes_rows_with_equal_budgets(tmp_path: Path):
    out = tmp_path / "out"
    args = [str(ROOT / "actions" / "phi4_m2-4_lam8.toml"), "--L", "4", "--seconds", "0.5",
            "--batch", "8", "--fresh", "64", "--only", "0", "4", "5", "6", "7", "--lr", "0.01",
            "--transfer", "6", "--out", str(out), "-q"]
    assert ablation_script.main(args) == 0
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["Fourier base alone", "spline, Fourier base",
                                          "spline, Fourier base", "Z₂ spline, Fourier base",
                                          "spline, Fourier base, even sites by heat bath"]
    assert [r["estimator"] for r in rows][1:] == ["reverse-fastpath", "reverse-standard",
                                                  "reverse-fastpath", "reverse-fastpath"]
    assert rows[3]["architecture"]["z2"] is True and rows[4]["architecture"]["heat_bath"]
    assert rows[0]["parameters"] == 3        # the precision polynomial's coefficients
    for r in rows:
        assert r["steps"] >= 1 and 0.5 <= r["train_s"] < 5 and 0 < r["ess"] <= 1
        assert list(r["transfer_ess"]) == ["6"] and 0 < r["transfer_ess"]["6"] <= 1
    table = (out / "ablation.md").read_text()
    assert "| spline, Fourier base | reverse-standard |" in table
    assert "ESS on L = 6 |" in table and "peak learning rate 0.01," in table
    before = (out / "ablation.md").read_bytes()
    assert ablation_script.main(args) == 2                 # no overwrite without --force
    assert (out / "ablation.md").read_bytes() == before


def test_refuses_an_odd_transfer_extent(tmp_path: Path, capsys):
    args = [str(ROOT / "actions" / "phi4_m2-4_lam8.toml"), "--L", "4", "--transfer", "7",
            "--out", str(tmp_path / "out"), "-q"]
    assert ablation_script.main(args) == 2
    assert "--transfer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_a_u1_card(tmp_path: Path, capsys):
    args = [str(ROOT / "actions" / "u1_beta2.toml"), "--L", "4", "--out", str(tmp_path), "-q"]
    assert ablation_script.main(args) == 2
    assert "phi4" in capsys.readouterr().err


def _trained_phi4_run(tmp_path: Path) -> Path:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('action = {theory = "phi4", form = "standard", m2 = -4, lam = 8}\n'
                      'lattice = [16, 16]\ndevice = "cpu"\ndtype = "float64"\n'
                      '[flow]\nbase = "fourier"\ntransform = "spline"\nn_couplings = 2\n'
                      'hidden = [2]\n[training]\nsteps = 2\nbatch_size = 4\ness_batch = 16\n')
    assert main(["-q", "train", str(recipe)]) == 0
    return tmp_path / "tiny"


def test_variants_from_trained_weights(tmp_path: Path):
    run = _trained_phi4_run(tmp_path)
    start = ablation.Start.from_run(run)
    action = Phi4(-4.0, 8.0)
    continued, grown = (start.flow(v, (16, 16), action)
                        for v in ablation.COARSE_LEVEL_VARIANTS[:2])
    x = continued.sample(4)[0].detach()
    # the added coarse levels start as the identity: the same density as the trained flow
    torch.testing.assert_close(grown.log_prob(x), continued.log_prob(x))
    out = tmp_path / "out"
    args = [str(ROOT / "actions" / "phi4_m2-4_lam8.toml"), "--L", "16", "--init", str(run),
            "--seconds", "0.3", "--batch", "4", "--fresh", "32", "--only", "0", "1",
            "--out", str(out), "-q"]
    assert ablation_script.main(args) == 0
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["architecture"]["coarse"] for r in rows] == [[], [4, 8, 16]]
    assert rows[1]["parameters"] > rows[0]["parameters"] and all(r["steps"] >= 1 for r in rows)
    assert "from the weights of" in (out / "ablation.md").read_text()


def test_refuses_a_missing_init_run_and_unknown_variants(tmp_path: Path, capsys):
    card = str(ROOT / "actions" / "phi4_m2-4_lam8.toml")
    assert ablation_script.main([card, "--L", "16", "--init", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "out"), "-q"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert ablation_script.main([card, "--L", "4", "--only", "9", "--out",
                                 str(tmp_path / "out"), "-q"]) == 2
    assert "--only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
