"""Faults users hit (issues 19 and 20): a full disk (a file-size limit, ``RLIMIT_FSIZE`` with
SIGXFSZ ignored, so that writes fail with EFBIG as on a full disk), a failing write, a second
process on a file or run directory that is in use, readers of a live file, and the size of a
file written in many small chunks. Everything runs as real ``latticeflow`` processes except the
file-size test."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from latticeflow.base.locking import RUN_LOCK_NAME
from latticeflow.ensemble import EnsembleReader, EnsembleWriter, read_ensemble
from latticeflow.samplers.chain import run_chain
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.theories import Phi4, U1Wilson
from tests.flow_helpers import random_flow
from tests.process_helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
RESUME_HINT = "free space, then `--resume`"

#: ``python -c LIMITED LIMIT ARGV...``: the CLI under a file-size limit of LIMIT bytes.
LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    from latticeflow.cli import main
    sys.exit(main(sys.argv[2:]))
""")

#: ``python -c FAILING N ARGV...``: the CLI whose N-th commit fails with EIO after the rows
#: and the resume state were written, before the flush.
FAILING = textwrap.dedent("""
    import errno, sys
    from latticeflow import ensemble
    from latticeflow.cli import main
    write, calls = ensemble.EnsembleWriter._write_resume_state, []
    def failing(self, state, n_rows):
        write(self, state, n_rows)
        calls.append(n_rows)
        if len(calls) == int(sys.argv[1]):
            raise OSError(errno.EIO, "Input/output error")
    ensemble.EnsembleWriter._write_resume_state = failing
    sys.exit(main(sys.argv[2:]))
""")

RECIPE = """\
action = "phi4.card.toml"
lattice = [4, 4]
seed = 0
device = "cpu"
[flow]
n_couplings = 2
hidden = [4]
[training]
batch_size = 16
steps = 2
ess_interval = 2
ess_batch = 32
[sampling]
n = 20
batch_size = 16
chunk = 10
"""


def cli(argv: list[str], cwd: Path, *, prefix: list[str] | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    command = [sys.executable, *(prefix or ["-m", "latticeflow.cli"]), *argv]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def limited(limit: int, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return cli(argv, cwd, prefix=["-c", LIMITED, str(limit)])


def assert_stopped(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, one line on stderr, nothing on stdout, no traceback, no success message."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result
    assert "Traceback" not in result.stderr and result.stdout == "", result
    for word in words:
        assert word in lines[0], result
    return lines[0]


def assert_bitwise_equal(path: Path, reference: Path) -> None:
    got, want = read_ensemble(path), read_ensemble(reference)
    assert len(got) == len(want) and set(got.data) == set(want.data)
    for name, value in want.data.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def phi4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tiny trained φ⁴ run ``phi4`` (4×4, 2 couplings, 2 steps)."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "phi4.card.toml").write_text('theory = "phi4"\nm2 = -4.0\nlam = 8.0\n')
    (folder / "phi4.toml").write_text(RECIPE)
    result = cli(["train", "phi4.toml"], folder)
    assert result.returncode == 0, result
    return folder


# ------------------------------------------------------------------------------ disk full
HMC = ["hmc", str(ROOT / "actions" / "u1_beta2.toml"), "--lattice", "4x4", "--n", "600",
       "--chunk", "20", "--therm", "5"]


@pytest.fixture(scope="module")
def hmc_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An undisturbed run of ``HMC``."""
    path = tmp_path_factory.mktemp("reference") / "ref.h5"
    assert cli([*HMC, "--out", str(path)], path.parent).returncode == 0
    return path


def test_hmc_disk_full_stops_cleanly_and_resumes_bitwise(hmc_reference: Path,
                                                         tmp_path: Path) -> None:
    limit = hmc_reference.stat().st_size  # too small for the run's last chunk
    full = limited(limit, [*HMC, "--out", "run.h5"], tmp_path)
    line = assert_stopped(full, "run.h5", RESUME_HINT, "File too large")
    ensemble = read_ensemble(tmp_path / "run.h5")
    n = len(ensemble)
    assert 0 < n < 600 and n % 20 == 0 and f"first {n} rows are safely" in line
    action = U1Wilson(2.0)(torch.from_numpy(ensemble["configs"])).numpy()
    np.testing.assert_allclose(ensemble["action"], action, rtol=1e-12)
    resumed = cli([*HMC, "--out", "run.h5", "--resume"], tmp_path)
    assert resumed.returncode == 0 and f"resuming run.h5 at row {n}" in resumed.stderr, resumed
    assert_bitwise_equal(tmp_path / "run.h5", hmc_reference)


def test_sample_disk_full_stops_cleanly_and_resumes_bitwise(phi4_run: Path) -> None:
    sample = ["sample", "phi4", "--n", "600", "--chunk", "20", "--batch-size", "64"]
    assert cli([*sample, "--out", "ref.h5"], phi4_run).returncode == 0
    limit = (phi4_run / "ref.h5").stat().st_size  # too small for the run's last chunk
    full = limited(limit, [*sample, "--out", "run.h5"], phi4_run)
    line = assert_stopped(full, "run.h5", RESUME_HINT)
    ensemble = read_ensemble(phi4_run / "run.h5")
    n = len(ensemble)
    assert 0 < n < 600 and n % 20 == 0 and f"first {n} rows are safely" in line
    configs = torch.from_numpy(ensemble["configs"]).double()
    action = Phi4(-4.0, 8.0)(configs).numpy()
    np.testing.assert_allclose(ensemble["action"], action, rtol=1e-5)  # float32 storage
    resumed = cli([*sample, "--out", "run.h5", "--resume"], phi4_run)
    assert resumed.returncode == 0, resumed
    assert_bitwise_equal(phi4_run / "run.h5", phi4_run / "ref.h5")


def test_failed_write_abandons_the_file_and_resumes_bitwise(hmc_reference: Path,
                                                           tmp_path: Path) -> None:
    """A write that fails in the middle of a commit (EIO): the rows committed before are
    intact, the file reads as if its writer had been killed, and --resume completes it."""
    failed = cli([*HMC, "--out", "run.h5"], tmp_path, prefix=["-c", FAILING, "3"])
    assert_stopped(failed, "writing rows 40..59 failed (Input/output error)",
                   "first 40 rows are safely", RESUME_HINT)
    assert len(read_ensemble(tmp_path / "run.h5")) == 40
    assert cli([*HMC, "--out", "run.h5", "--resume"], tmp_path).returncode == 0
    assert_bitwise_equal(tmp_path / "run.h5", hmc_reference)


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(phi4_run: Path,
                                                               tmp_path: Path) -> None:
    for name in ("phi4.card.toml", "phi4.toml"):
        (tmp_path / name).write_bytes((phi4_run / name).read_bytes())
    shutil.copytree(phi4_run / "phi4", tmp_path / "phi4")
    checkpoint = tmp_path / "phi4" / "checkpoint.pt"
    before = sha256(checkpoint)
    full = limited(checkpoint.stat().st_size - 1024, ["-q", "train", "phi4.toml", "--resume",
                                                      "--steps", "4"], tmp_path)
    assert_stopped(full, "checkpoint.pt: writing the checkpoint failed",
                   "the previous checkpoint (step 2) is intact", RESUME_HINT)
    assert sha256(checkpoint) == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [
        "checkpoint.pt", "metrics.csv", "training.png"]
    resumed = cli(["train", "phi4.toml", "--resume", "--steps", "4"], tmp_path)
    assert resumed.returncode == 0 and "done: step 4" in resumed.stderr, resumed


# ------------------------------------------------------------------------------ two processes
def committed(path: Path) -> int:
    """Rows committed in a live ensemble (0 before it exists)."""
    if not path.exists():
        return 0
    with EnsembleReader(path) as reader:
        return reader.n_complete


def test_live_file_refuses_force_and_resume_and_serves_readers(hmc_reference: Path,
                                                                tmp_path: Path) -> None:
    """While an hmc run writes run.h5 (held between two commits by an open reader here):
    --force and --resume are refused and change nothing; info and analysis/observables.py read
    it; released, the writer completes a file equal to an undisturbed run's."""
    hmc = HMC
    out = tmp_path / "run.h5"
    writer = subprocess.Popen([sys.executable, "-m", "latticeflow.cli", *hmc, "--out", "run.h5"],
                              cwd=tmp_path, env=ENV, text=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: committed(out) >= 100, writer)
        with EnsembleReader(out) as held:  # the writer cannot commit while this is open
            assert held.writer_pid == writer.pid
            digest = sha256(out)
            in_use = f"in use by another latticeflow process (pid {writer.pid})"
            for mode in ("--force", "--resume"):
                assert_stopped(cli([*hmc, "--out", "run.h5", mode], tmp_path), in_use)
            assert sha256(out) == digest
            info = cli(["info", "run.h5"], tmp_path)
            assert info.returncode == 0 and f"by pid {writer.pid}" in info.stdout, info
            assert re.search(rf"^n_complete +{held.n_complete}$", info.stdout, re.M), info
            observables = cli(["run.h5", "--thermalization", "10"], tmp_path,
                              prefix=[str(ROOT / "analysis" / "observables.py")])
            assert observables.returncode == 0, observables
            assert sha256(out) == digest
        _, stderr = writer.communicate(timeout=120)
    finally:
        writer.kill()
    assert writer.returncode == 0, stderr
    assert_bitwise_equal(out, hmc_reference)


def test_busy_run_directory_refuses_a_second_trainer(phi4_run: Path, tmp_path: Path) -> None:
    (tmp_path / "phi4.card.toml").write_bytes((phi4_run / "phi4.card.toml").read_bytes())
    (tmp_path / "long.toml").write_text(RECIPE.replace("steps = 2", "steps = 1000000"))
    lock = tmp_path / "long" / RUN_LOCK_NAME
    trainer = subprocess.Popen([sys.executable, "-m", "latticeflow.cli", "train", "long.toml"],
                               cwd=tmp_path, env=ENV, text=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lock.exists, trainer)
        in_use = f"in use by another latticeflow process (pid {trainer.pid})"
        for argv in (["-q", "train", "long.toml", "--force"], ["-q", "run", "long.toml"]):
            assert_stopped(cli(argv, tmp_path), in_use)
        assert trainer.poll() is None
        trainer.send_signal(signal.SIGINT)
        trainer.communicate(timeout=60)
    finally:
        trainer.kill()
    assert trainer.returncode == 130
    assert not lock.exists()


# ------------------------------------------------------------------------------ file size
def test_file_grows_with_rows_not_with_appends_times_batch(tmp_path: Path) -> None:
    """Issue 20: chunks of 10 rows from batches of 128 proposals. The unused proposals (up to
    a batch) are resume state, rewritten in place: the file grows by little more than the
    rows' bytes, and its size is the rows plus at most two batches of state."""
    action = Phi4(-4.0, 8.0)
    flow = random_flow("phi4", (16, 16))
    sampler = FlowMetropolis(flow, action, seed=1, batch_size=128)
    path = tmp_path / "run.h5"
    with EnsembleWriter.create(path, theory="phi4", action_card=action.card(), lattice=(16, 16),
                               field_shape=flow.field_shape, sampler="nmcmc", seed=1,
                               sampler_params={}, dtype="float32", chunk_rows=10) as writer:
        run_chain(sampler, writer, 1000, 10, progress=False)
        half = path.stat().st_size
        run_chain(sampler, writer, 2000, 10, progress=False)
    rows = sum(v.nbytes for v in read_ensemble(path).data.values())
    proposal = 8 * (16 * 16 + 3)  # x, log q, S and log u in float64
    assert path.stat().st_size - half <= 1.3 * rows / 2
    assert path.stat().st_size <= 1.3 * rows + 2 * 128 * proposal + (64 << 10)
