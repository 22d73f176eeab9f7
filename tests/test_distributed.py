"""Multi-process runs with 2 CPU processes (gloo): DDP training equals one process on the
concatenated batch, DDP resume, and sharded neural-MCMC ensembles joined by a virtual dataset.

One ``torch.multiprocessing.spawn`` of two workers does all the multi-process work (process
start-up dominates the cost); each worker sets torchrun's environment variables, so the code
paths are those of ``torchrun -m latticeflow.cli``. The tests then compare the workers' records
with single-process references computed here.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latticeflow import cli
from latticeflow.base.distributed import distributed_session, rank_seed, shard_path, split_rows
from latticeflow.base.errors import LatticeflowError
from latticeflow.config import load_recipe
from latticeflow.ensemble import EnsembleWriter, read_ensemble
from latticeflow.ensemble.proposals import read_proposal_summary
from latticeflow.training import Trainer, open_trainer, read_checkpoint, read_metrics

BATCH = 6  # per rank
CARD = 'theory = "phi4"\nform = "standard"\nm2 = -1.0\nlam = 1.0\n'
BASE = ('action = "card.toml"\ndevice = "cpu"\nlattice = [4, 4]\ndtype = "float64"\nseed = 11\n'
        '[flow]\nn_couplings = 2\nhidden = [4]\n'
        f'[training]\nbatch_size = {BATCH}\nsteps = 2\nlr = 1e-2\ness_interval = 1\n'
        'ess_batch = 16\ncheckpoint_interval = 1\n')
#: name → extra [training] lines; every estimator, and a forward one mixed with a reverse term.
CASES = {
    "reverse-standard": 'estimator = "reverse-standard"\n',
    "reverse-droppath": 'estimator = "reverse-droppath"\n',
    "reverse-fastpath": 'estimator = "reverse-fastpath"\n',
    "forward-standard": 'estimator = "forward-standard"\ndata = "data.h5"\n',
    "forward-droppath": 'estimator = "forward-droppath"\ndata = "data.h5"\n',
    "forward-fastpath": 'estimator = "forward-fastpath"\ndata = "data.h5"\n',
    "forward-fastpath+reverse": 'estimator = "forward-fastpath"\ndata = "data.h5"\n'
                                'reverse_weight = 0.3\n',
}
SAMPLE = ["--chunk", "6", "--chains", "2", "--batch-size", "4", "--device", "cpu"]


def write_recipes(root: Path) -> None:
    """One recipe file per case, plus ``run`` and ``single`` (reverse-fastpath); written before
    the workers start, which only read them."""
    for name, extra in {**CASES, "run": CASES["reverse-fastpath"], "single": ""}.items():
        (root / f"{name.replace('+', '_')}.toml").write_text(
            BASE.replace("[training]\n", "[training]\n" + extra))


def recipe(root: Path, name: str, overrides: dict | None = None):
    return load_recipe(root / f"{name.replace('+', '_')}.toml", overrides)


def perturb(flow: torch.nn.Module) -> None:
    """Non-zero last layers (a fresh flow is the identity, with many zero gradients)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _grads(flow: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in flow.parameters()]


def _worker(rank: int, root: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # as conftest.py does here: the same initial weights
    # A short timeout turns a rank stuck in a collective into a failure instead of a hang;
    # distributed_session uses the group that is already there.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    record: dict = {}
    with distributed_session("cpu") as context:
        assert context is not None and (context.rank, context.world_size) == (rank, 2)
        for name in CASES:
            trainer = Trainer(recipe(root, name), root / "scratch",
                              distributed=context)
            perturb(trainer.flow)
            batch, noise = trainer.draw_batch()
            trainer.flow.train()
            stats = trainer.backward(batch, noise)
            record[name] = {"batch": batch, "noise": noise, "grads": _grads(trainer.flow),
                            "loss": stats.loss, "logw_std": stats.logw_std}

        trainer = open_trainer(recipe(root, "run"), root / "ddp", distributed=context)
        batches = []
        draw = trainer.draw_batch

        def recording_draw():
            batches.append(draw())
            return batches[-1]

        trainer.draw_batch = recording_draw
        trainer.train()
        record["run"] = {"batches": batches, "model": trainer.flow.state_dict()}

        longer = recipe(root, "run", {"training.steps": 3})
        resumed = open_trainer(longer, root / "ddp", resume=True, distributed=context)
        resumed.train()
        straight = open_trainer(longer, root / "ddp_straight", distributed=context)
        straight.train()
        record["resume"] = {"resumed": resumed.flow.state_dict(),
                            "straight": straight.flow.state_dict()}

        out = str(root / "ens.h5")
        record["sample"] = cli.main(["sample", str(root / "single"), "--n", "24", "--out", out,
                                     *SAMPLE])
        if rank == 0:
            record["first"] = {k: np.asarray(v) for k, v in read_ensemble(out).data.items()}
        dist.barrier()
        record["resumed"] = cli.main(["sample", str(root / "single"), "--n", "48", "--out",
                                      out, "--resume", *SAMPLE])
    torch.save(record, root / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("ddp")
    (root / "card.toml").write_text(CARD)
    write_recipes(root)
    configs = np.random.default_rng(0).normal(size=(64, 4, 4))
    with EnsembleWriter.create(root / "data.h5", theory="phi4",
                               action_card={"theory": "phi4", "form": "standard", "m2": -1.0,
                                            "lam": 1.0},
                               lattice=(4, 4), field_shape=(4, 4), sampler="hmc", seed=0,
                               sampler_params={}) as writer:
        writer.append({"configs": configs, "action": np.zeros(64), "accepted": np.ones(64, bool),
                       "delta_H": np.zeros(64)}, {})
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        open_trainer(recipe(root, "single", {"training.steps": 1}),
                     root / "single").train()
        mp.spawn(_worker, args=(root, _free_port()), nprocs=2, join=True)
    finally:
        torch.set_num_threads(previous)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ------------------------------------------------------------------------------ training


def _reference(root: Path, name: str, batch: torch.Tensor, noise: torch.Tensor | None):
    """A single-process step with the given batch (and reverse noise): (trainer, stats)."""
    trainer = Trainer(recipe(root, name,
                                   {"training.batch_size": len(batch)}), root / "scratch")
    perturb(trainer.flow)
    trainer.flow.train()
    return trainer, trainer.backward(batch, noise)


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_gradient_equals_single_process_on_concatenated_batch(setup, name: str) -> None:
    root, ranks = setup
    mine, theirs = ranks[0][name], ranks[1][name]
    assert not torch.equal(mine["batch"], theirs["batch"])  # independent per-rank streams
    both = torch.cat([mine["batch"], theirs["batch"]])
    noise = None if mine["noise"] is None else torch.cat([mine["noise"], theirs["noise"]])
    reference, stats = _reference(root, name, both, noise)
    for a, b, ref in zip(mine["grads"], theirs["grads"], _grads(reference.flow), strict=True):
        assert torch.equal(a, b)                        # every rank holds the same average
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-13)
    assert mine["loss"] == pytest.approx(stats.loss, rel=1e-12)
    assert mine["logw_std"] == pytest.approx(stats.logw_std, rel=1e-12)
    # Rank 0's batch is the single-process stream, and its local gradient is not the average.
    single = Trainer(recipe(root, name), root / "scratch")
    assert torch.equal(single.draw_batch()[0], mine["batch"])
    local, _ = _reference(root, name, mine["batch"], None if noise is None else mine["noise"])
    assert not all(torch.allclose(a, g) for a, g in zip(mine["grads"], _grads(local.flow),
                                                        strict=True))


def test_ddp_training_run_equals_single_process_run(setup, monkeypatch) -> None:
    root, ranks = setup
    steps = [(torch.cat([b0[0], b1[0]]), None)
             for b0, b1 in zip(ranks[0]["run"]["batches"], ranks[1]["run"]["batches"],
                               strict=True)]
    monkeypatch.setattr(Trainer, "draw_batch", lambda self: steps[self.step])
    reference = open_trainer(recipe(root, "run",
                                          {"training.batch_size": 2 * BATCH}), root / "ref")
    reference.train()
    for key, value in reference.flow.state_dict().items():
        assert torch.equal(ranks[0]["run"]["model"][key], ranks[1]["run"]["model"][key])
        torch.testing.assert_close(ranks[0]["run"]["model"][key], value, rtol=1e-9, atol=1e-12)
    # Rank 0 wrote the metrics of the global batch, once per step.
    ddp, ref = read_metrics(root / "ddp" / "metrics.csv"), read_metrics(root / "ref" /
                                                                          "metrics.csv")
    assert list(ddp["step"]) == [1, 2, 3]           # after the resumed third step
    for column in ("loss", "logw_std", "ess"):
        np.testing.assert_allclose(ddp[column][:2], ref[column], rtol=1e-9, err_msg=column)


def test_ddp_checkpoint_and_resume(setup) -> None:
    root, ranks = setup
    state, _ = read_checkpoint(root / "ddp" / "checkpoint.pt")
    assert state["world_size"] == 2 and state["step"] == 3
    assert len(state["rng"]["train_ranks"]) == 2
    assert not torch.equal(*state["rng"]["train_ranks"])
    assert sorted(p.name for p in (root / "ddp").iterdir()) == ["checkpoint.pt", "metrics.csv",
                                                               "training.png"]
    for key, value in ranks[0]["resume"]["straight"].items():  # resume == uninterrupted
        assert torch.equal(ranks[0]["resume"]["resumed"][key], value), key
    with pytest.raises(LatticeflowError, match="2 process"):
        open_trainer(recipe(root, "run", {"training.steps": 4}), root / "ddp", resume=True)


# ------------------------------------------------------------------------------ sharded sampling


def test_sharded_ensemble_is_joined_by_a_virtual_dataset(setup) -> None:
    root, ranks = setup
    assert [r["sample"] for r in ranks] == [0, 0] and [r["resumed"] for r in ranks] == [0, 0]
    out = root / "ens.h5"
    shards = [read_ensemble(shard_path(out, r)) for r in range(2)]
    assert [len(s) for s in shards] == split_rows(48, 2) == [24, 24]
    seeds = [s.metadata.seed for s in shards]
    assert seeds == [rank_seed(12, 0), rank_seed(12, 1)] and seeds[0] != seeds[1]
    with h5py.File(out, "r") as f:                  # plain h5py
        n = int(f.attrs["n_complete"])
        assert n == 48 and f["configs"].is_virtual and f["configs"].shape == (48, 4, 4)
        assert json.loads(f.attrs["shards"]) == [{"file": "ens.rank0.h5", "rows": 24},
                                                 {"file": "ens.rank1.h5", "rows": 24}]
        plain = f["configs"][:n]
    joined = read_ensemble(out)
    assert joined.metadata.seed == 12 and joined.metadata.sampler_params["n_chains"] == 4
    for name in joined.data:
        np.testing.assert_array_equal(joined[name],
                                      np.concatenate([s[name] for s in shards]), err_msg=name)
    np.testing.assert_array_equal(plain, joined["configs"])
    assert set(shards[0]["chain"]) == {0, 1} and set(shards[1]["chain"]) == {2, 3}
    for c in range(4):   # every chain is a Markov chain of its own: rejected steps repeat
        rows = joined["chain"] == c
        moved = np.any(np.diff(joined["configs"][rows], axis=0) != 0, axis=(1, 2))
        np.testing.assert_array_equal(moved, joined["accepted"][rows][1:])
    # The resumed shards continue the first run: its rows are their prefixes.
    first = ranks[0]["first"]
    for r in range(2):
        np.testing.assert_array_equal(shards[r]["configs"][:12],
                                      first["configs"][12 * r:12 * (r + 1)])


def test_joined_file_refuses_missing_shards_and_appending(setup) -> None:
    root, _ = setup
    out = root / "ens.h5"
    with pytest.raises(LatticeflowError, match="appended"):
        EnsembleWriter.resume(out)
    moved = root / "elsewhere.h5"
    shard_path(out, 1).rename(moved)
    try:
        with pytest.raises(LatticeflowError, match="missing"):
            read_ensemble(out)
    finally:
        moved.rename(shard_path(out, 1))
    assert len(read_ensemble(out)) == 48


# ------------------------------------------------------------------------------ torchrun


def documented_sample_command() -> list[str]:
    """The sharded-sampling command line of docs/gpu.md (continuation lines joined)."""
    text = (Path(__file__).parents[1] / "docs" / "gpu.md").read_text()
    start = text.index("torchrun --standalone --nproc_per_node=4 -m latticeflow.cli sample")
    return shlex.split(text[start:text.index("```", start)].replace("\\\n", " "))


def test_documented_torchrun_sample_command(tmp_path: Path) -> None:
    """The documented command, through the real torchrun with 2 CPU processes: torchrun's
    parser must leave the row count (--rows) to latticeflow."""
    (tmp_path / "card.toml").write_text(CARD)
    (tmp_path / "single.toml").write_text(BASE)
    open_trainer(recipe(tmp_path, "single", {"training.steps": 1}), tmp_path / "run").train()
    documented = documented_sample_command()
    assert documented[documented.index("--rows") + 1] == "400000"
    values = {"--nproc_per_node=4": "--nproc_per_node=2", "runs/phi4_L16": str(tmp_path / "run"),
              "400000": "8", "phi4_L16.h5": str(tmp_path / "out.h5")}
    argv = [values.get(word, word) for word in documented]
    launcher = [shutil.which("torchrun") or sys.executable, *(
        [] if shutil.which("torchrun") else ["-m", "torch.distributed.run"])]
    proc = subprocess.run([*launcher, *argv[1:], "--device", "cpu", "--batch-size", "4",
                           "--chunk", "4"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    joined = read_ensemble(tmp_path / "out.h5")
    assert len(joined) == 8 and set(joined["chain"]) == {0, 1, 2, 3}
    assert read_proposal_summary(tmp_path / "out.h5").proposals == 8
