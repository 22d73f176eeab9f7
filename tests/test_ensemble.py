"""HDF5 ensemble schema v1, overwrite protection, validation of foreign and damaged files, and
exact (bitwise) resumption after an interruption, a simulated crash and a real SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest

import latticeflow
from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import EnsembleWriter, read_ensemble, row_datasets
from latticeflow.samplers.chain import load_resume_state, run_chain
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.theories import U1Wilson

ROOT = Path(__file__).resolve().parents[1]
HMC_ROWS = ("configs", "action", "accepted", "delta_H", "chain")


def _sampler(n_chains: int = 3, seed: int = 7) -> HMCSampler:
    config = HMCConfig(step_size=0.25, n_chains=n_chains, n_therm=5)
    return HMCSampler(U1Wilson(1.0), (4, 4), config, seed=seed)


def _run(path: Path, n_rows: int, chunk_rows: int, compression: str | None = "gzip"
         ) -> dict[str, np.ndarray]:
    """An uninterrupted reference run; returns its rows."""
    sampler = _sampler()
    with EnsembleWriter.create(path, **sampler.header(), chunk_rows=chunk_rows,
                               compression=compression) as writer:
        result = run_chain(sampler, writer, n_rows, chunk_rows, progress=False)
    assert result.n_complete == n_rows and not result.interrupted
    return read_ensemble(path).data


def _resume(path: Path, n_rows: int, chunk_rows: int) -> None:
    with EnsembleWriter.resume(path) as writer:
        sampler = HMCSampler.from_metadata(writer.metadata)
        assert load_resume_state(sampler, writer) == (writer.n_complete > 0)
        run_chain(sampler, writer, n_rows, chunk_rows, progress=False)


def _assert_same_rows(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                      n: int | None = None) -> None:
    for name in HMC_ROWS:
        reference = expected[name] if n is None else expected[name][:n]
        assert actual[name].dtype == reference.dtype
        np.testing.assert_array_equal(actual[name], reference, err_msg=name)


# ------------------------------------------------------------------------------ schema
def test_hmc_file_follows_schema_v1_and_reads_with_plain_h5py(tmp_path: Path) -> None:
    path = tmp_path / "hmc.h5"
    rows = _run(path, 20, 6)
    with h5py.File(path, "r") as f:
        attrs = f.attrs
        assert attrs["format"] == "latticeflow-ensemble"
        assert attrs["format_version"] == 1
        assert attrs["theory"] == "u1"
        assert json.loads(attrs["action_params"]) == {"theory": "u1", "beta": 1.0}
        assert attrs["lattice"].dtype.kind == "i" and list(attrs["lattice"]) == [4, 4]
        assert attrs["sampler"] == "hmc" and attrs["seed"] == 7
        created = datetime.fromisoformat(attrs["created"])
        assert created.utcoffset() == timedelta(0)
        assert attrs["latticeflow_version"] == latticeflow.__version__
        assert attrs["checkpoint_sha256"] == ""
        assert HMCConfig.from_dict(json.loads(attrs["sampler_params"])).n_chains == 3
        assert attrs["n_complete"] == 20
        assert set(f) == {"configs", "action", "accepted", "delta_H", "chain", "resume"}
        configs = f["configs"]
        assert configs.shape == (20, 2, 4, 4) and configs.dtype == np.float64
        assert configs.maxshape == (None, 2, 4, 4)
        assert configs.chunks == (1, 2, 4, 4) and configs.compression == "gzip"
        for name, kind in [("action", "f"), ("accepted", "b"), ("delta_H", "f"), ("chain", "i")]:
            assert f[name].shape == (20,) and f[name].maxshape == (None,)
            assert f[name].dtype.kind == kind
        assert f["chain"].dtype == np.int32
        np.testing.assert_array_equal(f["chain"][:], np.arange(20) % 3)
        np.testing.assert_array_equal(f["configs"][:], rows["configs"])
    metadata = read_ensemble(path).metadata
    assert metadata.lattice == (4, 4) and metadata.field_shape == (2, 4, 4)
    assert metadata.n_complete == 20 and metadata.datasets == HMC_ROWS


def test_uncompressed_configs_use_chunks_aligned_with_appends(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    rows = _run(path, 20, 6, compression=None)
    with h5py.File(path, "r") as f:
        assert f["configs"].compression is None and f["configs"].chunks == (6, 2, 4, 4)
    _assert_same_rows(rows, read_ensemble(_write_reference(tmp_path, 20)).data)


def _write_reference(tmp_path: Path, n_rows: int) -> Path:
    path = tmp_path / f"reference_{n_rows}.h5"
    if not path.exists():
        _run(path, n_rows, 7)
    return path


def test_nmcmc_file_has_log_q_and_log_weight(tmp_path: Path) -> None:
    path = tmp_path / "nmcmc.h5"
    sha = "ab" * 32
    with EnsembleWriter.create(path, theory="phi4", action_card={"theory": "phi4", "m2": -4.0,
                               "lam": 8.0, "form": "standard"}, lattice=(4, 4),
                               field_shape=(4, 4), sampler="nmcmc", seed=1,
                               sampler_params={"batch": 8}, checkpoint_sha256=sha,
                               dtype=np.float32) as writer:
        assert writer.datasets == row_datasets("nmcmc")
        k = 5
        rows = {"configs": np.ones((k, 4, 4)), "action": np.arange(k, dtype=float),
                "accepted": np.ones(k, bool), "log_q": -np.arange(k, dtype=float),
                "log_weight": np.zeros(k)}
        writer.append(rows, {"step": np.asarray(3)})
        with pytest.raises(ValueError, match="exactly the datasets"):
            writer.append({**rows, "delta_H": np.zeros(k)}, {})
        with pytest.raises(ValueError, match="rows"):
            writer.append({**rows, "log_q": np.zeros(k + 1)}, {})
    ensemble = read_ensemble(path)
    assert ensemble.metadata.checkpoint_sha256 == sha
    assert ensemble.metadata.config_dtype == np.float32
    assert set(ensemble.data) == {"configs", "action", "accepted", "log_q", "log_weight"}
    assert len(ensemble) == 5 and ensemble["configs"].dtype == np.float32
    np.testing.assert_array_equal(ensemble["log_q"], -np.arange(5.0))
    with EnsembleWriter.resume(path) as writer:
        assert int(writer.resume_state()["step"]) == 3


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    _run(path, 6, 3)
    header = _sampler().header()
    with pytest.raises(LatticeflowError, match="already exists"):
        EnsembleWriter.create(path, **header)
    assert read_ensemble(path).metadata.n_complete == 6          # untouched
    with EnsembleWriter.create(path, **header, force=True) as writer:
        assert writer.n_complete == 0
    assert len(read_ensemble(path)) == 0


# ------------------------------------------------------------------------------ bad files
def test_foreign_and_damaged_files_raise_latticeflow_error(tmp_path: Path) -> None:
    text = tmp_path / "text.h5"
    text.write_text("not hdf5\n")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    good = tmp_path / "good.h5"
    _run(good, 30, 10)
    future = tmp_path / "future.h5"
    future.write_bytes(good.read_bytes())
    with h5py.File(future, "r+") as f:
        f.attrs["format_version"] = 2
    short = tmp_path / "short.h5"
    short.write_bytes(good.read_bytes())
    with h5py.File(short, "r+") as f:
        f.attrs.modify("n_complete", 31)              # claims more rows than the datasets hold
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {text: "HDF5", foreign: "not a latticeflow ensemble", future: "format_version",
             short: "truncated", cut: "HDF5", tmp_path / "missing.h5": "no such"}
    for path, message in cases.items():
        with pytest.raises(LatticeflowError, match=message):
            read_ensemble(path)
        with pytest.raises(LatticeflowError):
            EnsembleWriter.resume(path)


# ------------------------------------------------------------------------------ resumption
class _InterruptAfter:
    """Sampler proxy whose ``advance`` raises KeyboardInterrupt on call number ``n + 1``."""

    def __init__(self, sampler: HMCSampler, n: int):
        self.sampler, self.calls, self.n = sampler, 0, n

    def advance(self, k: int) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return self.sampler.advance(k)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.sampler.load_state_dict(state)


def test_interrupted_then_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    reference = _run(tmp_path / "ref.h5", 40, 5)              # 5 rows per chunk, 3 chains
    path = tmp_path / "run.h5"
    sampler = _sampler()
    with EnsembleWriter.create(path, **sampler.header(), chunk_rows=5) as writer:
        result = run_chain(_InterruptAfter(sampler, 3), writer, 40, 5, progress=False)
    assert result.interrupted and result.n_complete == 15 and result.n_added == 15
    _assert_same_rows(read_ensemble(path).data, reference, 15)
    _resume(path, 40, 5)
    _assert_same_rows(read_ensemble(path).data, reference)


def test_resume_requires_the_stored_state(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    _run(path, 10, 5)
    with EnsembleWriter.resume(path) as writer:
        with pytest.raises(LatticeflowError, match="resume state"):
            run_chain(HMCSampler.from_metadata(writer.metadata), writer, 20, 5, progress=False)


def test_sigint_during_append_is_held_until_the_chunk_is_committed(tmp_path: Path) -> None:
    class InterruptedWriter(EnsembleWriter):
        def _write_resume_state(self, state: dict[str, np.ndarray], n_rows: int) -> None:
            if n_rows == 10:                                   # in the middle of chunk 2
                os.kill(os.getpid(), signal.SIGINT)
            super()._write_resume_state(state, n_rows)

    sampler = _sampler()
    path = tmp_path / "run.h5"
    with InterruptedWriter.create(path, **sampler.header(), chunk_rows=5) as writer:
        result = run_chain(sampler, writer, 40, 5, progress=False)
    assert result.interrupted and result.n_complete == 10
    _assert_same_rows(read_ensemble(path).data, read_ensemble(_write_reference(tmp_path, 40)).data,
                      10)


@pytest.mark.parametrize("compression", ["gzip", None])
def test_crash_between_rows_and_commit_is_rolled_back(tmp_path: Path, monkeypatch,
                                                      compression: str | None) -> None:
    """Rows and resume slot of the 3rd chunk are written and flushed but n_complete is not:
    the file shows 2 chunks, and resuming drops the orphan rows and reproduces the reference."""
    reference = _run(tmp_path / "ref.h5", 30, 6)
    path = tmp_path / "run.h5"
    commit = EnsembleWriter._commit
    calls = []

    def crashing_commit(self: EnsembleWriter, n_complete: int) -> None:
        calls.append(n_complete)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        commit(self, n_complete)

    monkeypatch.setattr(EnsembleWriter, "_commit", crashing_commit)
    sampler = _sampler()
    with EnsembleWriter.create(path, **sampler.header(), chunk_rows=4,
                               compression=compression) as writer:    # misaligned on purpose
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_chain(sampler, writer, 30, 6, progress=False)
    monkeypatch.setattr(EnsembleWriter, "_commit", commit)
    with h5py.File(path, "r") as f:
        assert f.attrs["n_complete"] == 12 and f["configs"].shape[0] == 18
    _assert_same_rows(read_ensemble(path).data, reference, 12)
    _resume(path, 30, 6)
    _assert_same_rows(read_ensemble(path).data, reference)


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from latticeflow.ensemble import EnsembleWriter
    from latticeflow.samplers.chain import load_resume_state, run_chain
    from latticeflow.samplers.hmc import HMCConfig, HMCSampler
    from latticeflow.theories import U1Wilson

    path, n_rows, chunk_rows = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    class Loud(EnsembleWriter):
        def append(self, rows, state):
            super().append(rows, state)
            print(self.n_complete, flush=True)

    if path.exists():
        writer = Loud.resume(path)
        sampler = HMCSampler.from_metadata(writer.metadata)
        load_resume_state(sampler, writer)
    else:
        sampler = HMCSampler(U1Wilson(1.0), (4, 4),
                             HMCConfig(step_size=0.25, n_chains=3, n_therm=5), seed=7)
        writer = Loud.create(path, **sampler.header(), chunk_rows=chunk_rows)
    run_chain(sampler, writer, n_rows, chunk_rows, progress=False)
    writer.close()
""")


def test_sigkill_leaves_a_valid_file_that_resumes_exactly(tmp_path: Path) -> None:
    """Kill a writing process with SIGKILL three times at random moments (a random number of
    new chunks in, then a few milliseconds more, so that the kill lands anywhere in a chunk's
    write and the run never finishes first); each time the committed rows must be intact and
    the file resumable; the completed file must equal an uninterrupted run bit for bit."""
    n_rows, chunk_rows = 400, 2            # tiny chunks: the child spends most time in append
    reference = _run(tmp_path / "ref.h5", n_rows, 50)   # the rows do not depend on chunking
    path = tmp_path / "killed.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-c", _CHILD, str(path), str(n_rows), str(chunk_rows)]
    rng = random.Random(1)
    committed = 0
    for _ in range(3):
        child = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
        try:
            target = committed + 2 * rng.randint(5, 50)    # at most 300 of the 400 rows
            while (reported := int(child.stdout.readline())) < target:
                pass
            time.sleep(rng.uniform(0.0, 0.005))
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=60)
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        rows = read_ensemble(path).data
        n = len(rows["configs"])
        assert committed < reported <= n < n_rows
        _assert_same_rows(rows, reference, n)
        committed = n
    _resume(path, n_rows, 50)
    _assert_same_rows(read_ensemble(path).data, reference)


class _Killed(Exception):
    """Stands for the SIGKILL of :class:`_KilledBeforeSuperblock`."""


class _KilledBeforeSuperblock(EnsembleWriter):
    """A writer killed inside the flush of its ``kill_at``-th chunk (before the commit) at the
    moment HDF5 has written every changed object but not yet the superblock, which it writes
    last: the superblock on disk still holds the previous commit's end of allocation (EOA),
    while links to objects allocated beyond it are on disk. The superblock is put back as it
    was before the flush and the file is then dropped without another write, as a kill would.
    With ``unwritten``, the kill comes earlier, before the objects beyond the old EOA (written
    after the objects that link them, which lie below it): that part of the file is zeroed."""

    kill_at = 0
    unwritten = False
    _appends = 0

    def append(self, rows, resume_state) -> None:
        self._appends += 1
        super().append(rows, resume_state)

    def _flush(self) -> None:
        if self._appends == self.kill_at:
            superblock = os.pread(self._lock.fd, 48, 0)        # a version 2 superblock
            self._file.flush()
            assert os.pread(self._lock.fd, 48, 0) != superblock   # the EOA grew
            os.pwrite(self._lock.fd, superblock, 0)
            if self.unwritten:
                eoa = int.from_bytes(superblock[28:36], "little")
                size = os.fstat(self._lock.fd).st_size
                os.pwrite(self._lock.fd, bytes(size - eoa), eoa)
            raise _Killed
        super()._flush()


def _synthetic_rows(start: int, k: int) -> dict[str, np.ndarray]:
    i = np.arange(start, start + k)
    return {"configs": np.ones((k, 2, 4, 4)) * (i[:, None, None, None] + 0.5),
            "action": i * 1.5, "accepted": i % 2 == 0, "delta_H": -i / 7.0,
            "chain": (i % 3).astype(np.int32)}


def _synthetic_state(n_rows: int) -> dict[str, np.ndarray]:
    """Fixed entries and one that grows with every chunk (its capacity: new HDF5 chunks)."""
    return {"next": np.int64(n_rows), "x": np.full((3, 2, 4, 4), float(n_rows)),
            "tail": np.arange(n_rows, dtype=np.float64)}


@pytest.mark.parametrize("unwritten", [False, True])
@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_kill_inside_a_flush_leaves_a_resumable_file(tmp_path: Path, kill_at: int,
                                                     unwritten: bool) -> None:
    """HDF5 flushes the superblock, with the file's end of allocation, after all other metadata;
    a kill in between left links to objects beyond it (once: resume failed with "len not
    positive after adjustment for EOA" on the slot created by the second chunk). The committed
    rows must read, and resuming must complete the file exactly."""
    n_rows, chunk = 10, 2
    header = {**_sampler().header(), "chunk_rows": chunk}
    path = tmp_path / "killed.h5"
    writer = _KilledBeforeSuperblock.create(path, **header)
    writer.kill_at, writer.unwritten = kill_at, unwritten
    with pytest.raises(_Killed):
        for start in range(0, n_rows, chunk):
            writer.append(_synthetic_rows(start, chunk), _synthetic_state(start + chunk))
    writer._abandon()
    committed = chunk * (kill_at - 1)
    reference = _synthetic_rows(0, n_rows)
    _assert_same_rows(read_ensemble(path).data, reference, committed)
    with EnsembleWriter.resume(path) as resumed:
        assert resumed.n_complete == committed
        state = resumed.resume_state()
        if committed:
            for name, value in _synthetic_state(committed).items():
                np.testing.assert_array_equal(state[name], value, err_msg=name)
        else:
            assert state is None
        for start in range(committed, n_rows, chunk):
            resumed.append(_synthetic_rows(start, chunk), _synthetic_state(start + chunk))
    _assert_same_rows(read_ensemble(path).data, reference)
    with EnsembleWriter.resume(path) as resumed:
        np.testing.assert_array_equal(resumed.resume_state()["tail"], np.arange(n_rows))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5"]
