"""The ``latticeflow`` command on bad input (issue 6): no traceback, no lost data.

Every case runs the real command in its own process and checks: exit code 2 (130 when
interrupted), stderr is exactly one non-empty line that names the problem (a file or a key), no
"Traceback" anywhere, and every file that was in the case's directory before is byte-identical
afterwards, with no new files left behind.

Start-up (Python, torch, h5py, matplotlib) costs 3-7 s of one core per process on this machine,
so the bad-input battery runs through a small *fork server*: one process imports latticeflow
once, then forks a child per invocation that runs ``latticeflow.cli.main(argv)`` exactly as the
console script does (``sys.exit(main())``; an uncaught exception prints its traceback and exits
with 1), in the case's directory, with stdin from /dev/null and stdout/stderr in files (not a
terminal). The real console script is driven directly for ``--version``, a cross-check of the
server on two bad-input cases, and the Ctrl-C tests (SIGINT → 130, file valid, ``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from process_helpers import wait_for

import latticeflow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "COLUMNS": "100"}
for _key in ("FORCE_COLOR", "TQDM_DISABLE"):
    ENV.pop(_key, None)

_SCRIPT = Path(sys.executable).with_name("latticeflow")
#: The real command: the console script of this interpreter's environment, else ``-m``.
LATTICEFLOW = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "latticeflow.cli"]

# ------------------------------------------------------------------------------ fork server

SERVER = r'''
import fcntl, importlib, json, os, signal, struct, sys, termios, time, traceback
from latticeflow import cli
for name in cli.COMMANDS:
    importlib.import_module("latticeflow.commands." + name)
for name in ("latticeflow.measure", "latticeflow.measure.plots", "latticeflow.script_support",
             "torch._dynamo"):  # torch._dynamo: imported by the first optimizer (~4 s)
    importlib.import_module(name)
PARALLEL = 2
scratch = sys.argv[1]


def child(job, out, err, tty):
    code = 1
    try:
        signal.alarm(120)  # a hanging case ends (exit status -14) instead of the test run
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(tty if tty is not None else
                os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.chdir(job["cwd"])
        sys.argv = ["latticeflow", *job["argv"]]
        code = cli.main(job["argv"])          # the console script: sys.exit(main())
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def read_all(fd):
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def run_batch(jobs):
    pending, running, results = list(jobs), {}, {}
    started = {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            job = pending.pop(0)
            out, err = f"{scratch}/{job['id']}.out", f"{scratch}/{job['id']}.err"
            master = slave = None
            if job.get("tty"):
                master, slave = os.openpty()
                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(job, out, err, slave)
            if slave is not None:
                os.close(slave)
            running[pid] = (job, out, err, master)
            started[pid] = time.perf_counter()
        pid, status = os.wait()
        job, out, err, master = running.pop(pid)
        with open(out, errors="replace") as f:
            stdout = f.read()
        if master is not None:
            stderr = read_all(master)
        else:
            with open(err, errors="replace") as f:
                stderr = f.read()
        results[job["id"]] = {"rc": os.waitstatus_to_exitcode(status), "stdout": stdout,
                              "stderr": stderr, "seconds": time.perf_counter() - started[pid]}
    return results


print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    print(json.dumps(run_batch(json.loads(line))), flush=True)
'''


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit code {self.rc}\n--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}"


class Server:
    """Runs batches of ``latticeflow`` invocations, each in a forked child of one warm process."""

    def __init__(self, scratch: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(scratch)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=ENV)
        self._ready = False
        self._count = 0

    def run(self, jobs: list[tuple[list[str], Path]], tty: bool = False) -> list[Result]:
        """``jobs``: (argv, cwd) pairs, run concurrently (two at a time)."""
        if not self._ready:
            assert json.loads(self.proc.stdout.readline()) == "ready", "fork server failed"
            self._ready = True
        batch = []
        for argv, cwd in jobs:
            self._count += 1
            batch.append({"id": f"job{self._count}", "argv": argv, "cwd": str(cwd), "tty": tty})
        self.proc.stdin.write(json.dumps(batch) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "fork server died"
        results = json.loads(line)
        return [Result(**results[job["id"]]) for job in batch]

    def one(self, argv: str | list[str], cwd: Path) -> Result:
        return self.run([(shlex.split(argv) if isinstance(argv, str) else argv, cwd)])[0]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # idle between batches: nothing to lose, and exiting takes seconds
        self.proc.wait(timeout=30)


def real(argv: list[str], cwd: Path, timeout: float = 120) -> Result:
    """The real console script in a fresh process."""
    proc = subprocess.run([*LATTICEFLOW, *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ------------------------------------------------------------------------------ fixtures

PHI4_CARD = 'theory = "phi4"\nm2 = -4.0\nlam = 8.0\n'
U1_CARD = 'theory = "u1"\nbeta = 2.0\n'
BODY = """\
seed = 0
device = "cpu"
[flow]
n_couplings = 2
hidden = [4]
[training]
batch_size = 16
steps = 3
ess_interval = 3
ess_batch = 32
[sampling]
n = 20
batch_size = 16
chunk = 10
"""


def recipe(card: str = "phi4.card.toml", lattice: str = "[4, 4]", top: str = "",
           training: str = "", body: str = BODY) -> str:
    text = f'action = "{card}"\nlattice = {lattice}\n{top}{body}'
    return text.replace("[training]\n", "[training]\n" + training)


#: Small input files of the battery (name → text or bytes).
TEXT_FILES: dict[str, str | bytes] = {
    "phi4.card.toml": PHI4_CARD,
    "u1.card.toml": U1_CARD,
    "phi4.toml": recipe(),
    "u1.toml": recipe("u1.card.toml"),
    "long.toml": recipe(training="checkpoint_interval = 100000\n").replace(
        "steps = 3", "steps = 1000000"),
    "file.txt": "a regular file, used as if it were a folder\n",
    "binary.toml": b"\xff\xfe\x00\x81 not text",
    "bad.toml": 'action = "phi4.card.toml"\nlattice = [4, 4\n',
    "bad.card.toml": 'theory = "u1\nbeta = 2.0\n',
    "badcard.toml": recipe("bad.card.toml"),
    "nocard.toml": recipe("missing.card.toml"),
    "unknown.toml": recipe(training="stepz = 3\n"),
    "unknown_top.toml": recipe(top="sead = 1\n"),
    "wrongtype.toml": recipe().replace("steps = 3", 'steps = "3"'),
    "lattice_str.toml": recipe(lattice='"4x4"'),
    "nanlr.toml": recipe(training="lr = nan\n"),
    "infclip.toml": recipe(training="grad_clip = inf\n"),
    "batch0.toml": recipe().replace("batch_size = 16\nsteps", "batch_size = 0\nsteps"),
    "therm.toml": recipe() + "[analysis]\nthermalization = 20\n",
    "nan.card.toml": 'theory = "phi4"\nm2 = nan\nlam = 8.0\n',
    "inf.card.toml": 'theory = "phi4"\nm2 = -4.0\nlam = inf\n',
    "neg.card.toml": 'theory = "u1"\nbeta = -1.0\n',
    "str.card.toml": 'theory = "u1"\nbeta = "2"\n',
    "unk.card.toml": 'theory = "u1"\nbeta = 2.0\nbetta = 2.0\n',
    "nancard.toml": recipe("nan.card.toml"),
    "infcard.toml": recipe("inf.card.toml"),
    "odd.toml": recipe(lattice="[5, 5]"),
    "u1odd.toml": recipe("u1.card.toml", lattice="[6, 6]"),
    "fwd_missing.toml": recipe(training='estimator = "forward-fastpath"\ndata = "missing.h5"\n'),
    "fwd_foreign.toml": recipe(training='estimator = "forward-fastpath"\ndata = "foreign.h5"\n'),
    "fwd_trunc.toml": recipe(training='estimator = "forward-fastpath"\ndata = "trunc.h5"\n'),
    "fwd_other.toml": recipe("u1.card.toml",
                             training='estimator = "forward-fastpath"\ndata = "hmc.h5"\n'),
    "wide.toml": recipe().replace("hidden = [4]", "hidden = [8]"),
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def lib(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture files: tiny φ⁴ and U(1) runs (4×4, 2 couplings, hidden [4], 3 steps), a φ⁴
    HMC ensemble, an ensemble sampled from the φ⁴ run, and broken copies of them."""
    lib = tmp_path_factory.mktemp("lib")
    for name, content in TEXT_FILES.items():
        (lib / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    made = server.run([
        (["train", "phi4.toml"], lib),
        (["train", "u1.toml"], lib),
        (["hmc", "phi4.card.toml", "--lattice", "4x4", "--n", "20", "--chunk", "10",
          "--therm", "5", "--out", "hmc.h5"], lib),
    ])
    made += server.run([(["sample", "phi4", "--out", "nmcmc.h5"], lib)])
    for result in made:
        assert result.rc == 0, result
    with h5py.File(lib / "foreign.h5", "w") as f:  # HDF5, but not a latticeflow ensemble
        f["data"] = np.arange(10.0)
        f.attrs["title"] = "something else"
    ensemble = (lib / "hmc.h5").read_bytes()
    (lib / "trunc.h5").write_bytes(ensemble[: len(ensemble) // 2])
    checkpoint = (lib / "phi4" / "checkpoint.pt").read_bytes()
    (lib / "trunc.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    (lib / "garbage.pt").write_bytes(b"not a checkpoint\n" * 8)
    (lib / "bench.json").write_text('{"previous": "results"}\n')
    (lib / "adir").mkdir()
    return lib


# ------------------------------------------------------------------------------ the battery


@dataclass(frozen=True)
class Case:
    """``argv`` run in a fresh folder holding ``files`` (``"dest=src"`` copies ``src`` of the
    fixture library to ``dest``); the one error line must contain every string of ``names``."""

    id: str
    argv: str
    files: tuple[str, ...]
    names: tuple[str, ...]

    def param(self):
        return pytest.param(self, id=self.id)


P4, U1 = ("phi4.card.toml",), ("u1.card.toml",)
RECIPE = ("phi4.toml", *P4)
PHI4_RUN, U1_RUN = ("phi4",), ("u1",)
HMC = "hmc u1.card.toml --lattice 4x4 --n 5 --therm 2"
BENCH = ("bench estimators --theory phi4 --lattice 4 --batch 4 --repeats 1 --warmup 0 "
         "--estimator reverse-fastpath --couplings 1 --hidden 2")

CASES = [
    # ---- missing or unreadable file
    Case("run-missing-recipe", "run missing.toml", (), ("missing.toml", "not found")),
    Case("train-missing-recipe", "train missing.toml", (), ("missing.toml", "not found")),
    Case("run-undecodable-recipe", "run binary.toml", ("binary.toml",), ("binary.toml",)),
    Case("train-recipe-is-folder", "train adir", ("adir",), ("adir", "cannot read")),
    Case("hmc-missing-card", "hmc missing.card.toml --lattice 4x4 --n 5 --out x.h5", (),
         ("missing.card.toml",)),
    Case("hmc-card-is-folder", "hmc adir --lattice 4x4 --n 5 --out x.h5", ("adir",),
         ("adir",)),
    Case("sample-missing-run", "sample missing --out x.h5", (), ("missing",)),
    Case("info-missing", "info missing.h5", (), ("missing.h5",)),
    Case("info-folder-without-checkpoint", "info adir", ("adir",), ("adir", "checkpoint.pt")),
    Case("train-init-from-missing", "train phi4.toml --out new --init-from missing.pt", RECIPE,
         ("missing.pt",)),
    Case("train-missing-data", "train fwd_missing.toml", ("fwd_missing.toml", *P4),
         ("training.data", "missing.h5")),
    # ---- malformed TOML
    Case("run-malformed", "run bad.toml", ("bad.toml",), ("bad.toml", "malformed TOML")),
    Case("train-malformed", "train bad.toml", ("bad.toml",), ("bad.toml", "malformed TOML")),
    Case("hmc-malformed-card", "hmc bad.card.toml --lattice 4x4 --n 5 --out x.h5",
         ("bad.card.toml",), ("bad.card.toml", "malformed TOML")),
    Case("train-malformed-card", "train badcard.toml", ("badcard.toml", "bad.card.toml"),
         ("bad.card.toml", "malformed TOML")),
    # ---- a recipe naming a missing action card
    Case("run-missing-card", "run nocard.toml", ("nocard.toml",), ("missing.card.toml",)),
    Case("train-missing-card", "train nocard.toml", ("nocard.toml",), ("missing.card.toml",)),
    # ---- unknown keys
    Case("run-unknown-key", "run unknown.toml", ("unknown.toml", *P4),
         ("unknown.toml", "training.stepz", "unknown key")),
    Case("train-unknown-key", "train unknown_top.toml", ("unknown_top.toml", *P4),
         ("unknown_top.toml", "sead", "unknown key")),
    Case("hmc-unknown-card-key", "hmc unk.card.toml --lattice 4x4 --n 5 --out x.h5",
         ("unk.card.toml",), ("unk.card.toml", "betta", "unknown key")),
    Case("hmc-unknown-option", f"{HMC} --out x.h5 --bogus 1", U1, ("--bogus",)),
    # ---- wrong types
    Case("run-wrong-type", "run wrongtype.toml", ("wrongtype.toml", *P4),
         ("wrongtype.toml", "training.steps", "integer")),
    Case("train-wrong-type", "train lattice_str.toml", ("lattice_str.toml", *P4),
         ("lattice_str.toml", "lattice")),
    Case("hmc-wrong-type-card", "hmc str.card.toml --lattice 4x4 --n 5 --out x.h5",
         ("str.card.toml",), ("str.card.toml", "beta")),
    Case("hmc-n-not-int", "hmc u1.card.toml --lattice 4x4 --n abc --out x.h5", U1, ("--n",)),
    Case("sample-n-not-int", "sample phi4 --n 1.5 --out x.h5", PHI4_RUN, ("--n",)),
    Case("train-steps-not-int", "train phi4.toml --steps x --out new", RECIPE, ("--steps",)),
    Case("bench-batch-not-int", "bench estimators --batch x", (), ("--batch",)),
    # ---- NaN, inf and out-of-range parameters
    Case("run-nan-lr", "run nanlr.toml", ("nanlr.toml", *P4), ("training.lr", "finite")),
    Case("train-inf-grad-clip", "train infclip.toml", ("infclip.toml", *P4),
         ("training.grad_clip", "finite")),
    Case("train-nan-in-card", "train nancard.toml", ("nancard.toml", "nan.card.toml"),
         ("nan.card.toml", "m2")),
    Case("run-inf-in-card", "run infcard.toml", ("infcard.toml", "inf.card.toml"),
         ("inf.card.toml", "lam")),
    Case("train-batch-size-0", "train batch0.toml", ("batch0.toml", *P4),
         ("training.batch_size",)),
    Case("run-thermalization-too-long", "run therm.toml", ("therm.toml", *P4),
         ("analysis.thermalization",)),
    Case("hmc-nan-card", "hmc nan.card.toml --lattice 4x4 --n 5 --out x.h5",
         ("nan.card.toml",), ("nan.card.toml", "m2", "finite")),
    Case("hmc-inf-card", "hmc inf.card.toml --lattice 4x4 --n 5 --out x.h5",
         ("inf.card.toml",), ("inf.card.toml", "lam", "finite")),
    Case("hmc-negative-beta", "hmc neg.card.toml --lattice 4x4 --n 5 --out x.h5",
         ("neg.card.toml",), ("neg.card.toml", "beta")),
    Case("hmc-nan-step-size", f"{HMC} --out x.h5 --step-size nan", U1, ("--step-size",)),
    Case("hmc-inf-step-size", f"{HMC} --out x.h5 --step-size inf", U1, ("--step-size",)),
    Case("hmc-inf-trajectory", f"{HMC} --out x.h5 --trajectory-length inf", U1,
         ("--trajectory-length",)),
    Case("hmc-target-accept-2", f"{HMC} --out x.h5 --target-accept 2", U1, ("target_accept",)),
    Case("hmc-negative-therm", f"{HMC} --out x.h5 --therm -1", U1, ("n_therm",)),
    Case("hmc-save-every-0", f"{HMC} --out x.h5 --save-every 0", U1, ("save_every",)),
    Case("hmc-chains-0", f"{HMC} --out x.h5 --chains 0", U1, ("n_chains",)),
    Case("hmc-negative-seed", f"{HMC} --out x.h5 --seed -1", U1, ("--seed",)),
    Case("hmc-huge-seed", f"{HMC} --out x.h5 --seed {2**64}", U1, ("--seed",)),
    Case("hmc-unknown-device", f"{HMC} --out x.h5 --device tpu", U1, ("tpu",)),
    Case("sample-negative-seed", "sample phi4 --out x.h5 --seed -1", PHI4_RUN, ("--seed",)),
    Case("sample-batch-size-0", "sample phi4 --out x.h5 --batch-size 0", PHI4_RUN,
         ("--batch-size",)),
    Case("sample-chains-0", "sample phi4 --out x.h5 --chains 0", PHI4_RUN, ("--chains",)),
    Case("sample-unknown-device", "sample phi4 --out x.h5 --device tpu", PHI4_RUN, ("tpu",)),
    Case("train-threads-0", "train phi4.toml --out new --threads 0", RECIPE, ("--threads",)),
    Case("train-unknown-device", "train phi4.toml --out new --device tpu", RECIPE,
         ("phi4.toml", "device", "tpu")),
    Case("bench-repeats-0", "bench estimators --repeats 0", (), ("--repeats",)),
    Case("bench-unknown-device", "bench estimators --device tpu", (), ("tpu",)),
    Case("bench-threads-negative", f"{BENCH} --threads -1", (), ("--threads",)),
    Case("bench-couplings-0", "bench estimators --theory phi4 --lattice 4 --batch 4 "
         "--repeats 1 --warmup 0 --couplings 0", (), ("--couplings",)),
    Case("bench-even-kernel", f"{BENCH} --kernel 2", (), ("--kernel",)),
    Case("bench-hidden-0", f"{BENCH} --hidden 0", (), ("--hidden",)),
    # ---- a lattice size the flow (or theory) cannot take
    Case("run-odd-lattice", "run odd.toml", ("odd.toml", *P4), ("odd.toml", "lattice")),
    Case("train-u1-lattice-6", "train u1odd.toml", ("u1odd.toml", *U1),
         ("u1odd.toml", "lattice")),
    Case("sample-odd-lattice", "sample phi4 --lattice 5x5 --out x.h5", PHI4_RUN,
         ("lattice", "(5, 5)")),
    Case("sample-u1-3d-lattice", "sample u1 --lattice 4x4x4 --out x.h5", U1_RUN,
         ("lattice", "(4, 4, 4)")),
    Case("hmc-u1-3d-lattice", "hmc u1.card.toml --lattice 4x4x4 --n 5 --out x.h5", U1,
         ("--lattice", "4x4x4")),
    Case("hmc-zero-extent", "hmc u1.card.toml --lattice 0x4 --n 5 --out x.h5", U1,
         ("--lattice",)),
    Case("hmc-malformed-lattice", "hmc u1.card.toml --lattice 4y4 --n 5 --out x.h5", U1,
         ("--lattice",)),
    Case("bench-u1-lattice-6", "bench estimators --theory u1 --lattice 6", (),
         ("lattice 6",)),
    Case("bench-scaling-u1-lattice-6", "bench scaling --theory u1 --lattice 6", (),
         ("lattice 6",)),
    # ---- truncated or foreign HDF5 files, truncated or foreign checkpoints
    Case("info-truncated-h5", "info trunc.h5", ("trunc.h5",), ("trunc.h5",)),
    Case("info-foreign-h5", "info foreign.h5", ("foreign.h5",),
         ("foreign.h5", "not a latticeflow ensemble")),
    Case("info-not-hdf5", "info phi4.toml", ("phi4.toml",), ("phi4.toml",)),
    Case("info-truncated-checkpoint", "info trunc.pt", ("trunc.pt",), ("trunc.pt",)),
    Case("info-foreign-checkpoint", "info garbage.pt", ("garbage.pt",),
         ("garbage.pt", "not a latticeflow checkpoint")),
    Case("sample-truncated-checkpoint", "sample trunc.pt --out x.h5", ("trunc.pt",),
         ("trunc.pt",)),
    Case("sample-foreign-checkpoint", "sample garbage.pt --out x.h5", ("garbage.pt",),
         ("garbage.pt",)),
    Case("sample-resume-truncated", "sample phi4 --out trunc.h5 --resume",
         ("trunc.h5", *PHI4_RUN), ("trunc.h5",)),
    Case("sample-resume-foreign", "sample phi4 --out foreign.h5 --resume",
         ("foreign.h5", *PHI4_RUN), ("foreign.h5",)),
    Case("hmc-resume-truncated", f"{HMC} --out trunc.h5 --resume", ("trunc.h5", *U1),
         ("trunc.h5",)),
    Case("hmc-resume-foreign", f"{HMC} --out foreign.h5 --resume", ("foreign.h5", *U1),
         ("foreign.h5",)),
    Case("train-data-truncated", "train fwd_trunc.toml", ("fwd_trunc.toml", "trunc.h5", *P4),
         ("trunc.h5",)),
    Case("train-data-foreign", "train fwd_foreign.toml",
         ("fwd_foreign.toml", "foreign.h5", *P4), ("foreign.h5",)),
    Case("train-init-from-foreign", "train phi4.toml --out new --init-from garbage.pt",
         (*RECIPE, "garbage.pt"), ("garbage.pt",)),
    Case("run-truncated-ensemble", "run phi4.toml",
         (*RECIPE, "phi4", "phi4/nmcmc.h5=trunc.h5"), ("nmcmc.h5",)),
    Case("run-foreign-ensemble", "run phi4.toml",
         (*RECIPE, "phi4", "phi4/nmcmc.h5=foreign.h5"), ("nmcmc.h5",)),
    Case("run-foreign-checkpoint", "run phi4.toml",
         (*RECIPE, "phi4/checkpoint.pt=garbage.pt"), ("checkpoint.pt",)),
    # ---- a checkpoint (or ensemble) of another theory or another run
    Case("train-init-from-other-theory", "train phi4.toml --out new --init-from u1",
         (*RECIPE, *U1_RUN), ("u1", "init-from")),
    Case("train-init-from-other-architecture", "train wide.toml --out new --init-from phi4",
         ("wide.toml", *P4, *PHI4_RUN), ("phi4", "architecture")),
    Case("train-resume-other-theory", "train phi4.toml --resume",
         (*RECIPE, "phi4/checkpoint.pt=u1/checkpoint.pt"), ("checkpoint.pt", "action")),
    Case("train-data-other-theory", "train fwd_other.toml", ("fwd_other.toml", "hmc.h5", *U1),
         ("hmc.h5", "does not match")),
    Case("sample-resume-other-checkpoint", "sample u1 --out nmcmc.h5 --resume",
         ("nmcmc.h5", *U1_RUN), ("nmcmc.h5", "checkpoint_sha256")),
    Case("sample-resume-hmc-file", "sample phi4 --out hmc.h5 --resume", ("hmc.h5", *PHI4_RUN),
         ("hmc.h5", "sampler")),
    Case("hmc-resume-other-theory", f"{HMC} --out hmc.h5 --resume", ("hmc.h5", *U1),
         ("hmc.h5", "theory")),
    Case("run-checkpoint-other-theory", "run phi4.toml",
         (*RECIPE, "phi4/checkpoint.pt=u1/checkpoint.pt"), ("checkpoint.pt", "action")),
    Case("run-ensemble-other-checkpoint", "run u1.toml", ("u1.toml", *U1, "u1",
                                                          "u1/nmcmc.h5=nmcmc.h5"),
         ("nmcmc.h5", "another checkpoint")),
    # ---- an output that exists (refused without --force)
    Case("hmc-output-exists", f"{HMC} --out hmc.h5", ("hmc.h5", *U1),
         ("hmc.h5", "already exists", "--force")),
    Case("hmc-output-is-folder", f"{HMC} --out adir", ("adir", *U1), ("adir", "directory")),
    Case("sample-output-exists", "sample phi4 --out nmcmc.h5", ("nmcmc.h5", *PHI4_RUN),
         ("nmcmc.h5", "already exists", "--force")),
    Case("sample-default-output-exists", "sample phi4",
         (*PHI4_RUN, "phi4/nmcmc.h5=nmcmc.h5"), ("nmcmc.h5", "already exists")),
    Case("train-checkpoint-exists", "train phi4.toml", (*RECIPE, *PHI4_RUN),
         ("checkpoint.pt", "already exists", "--force")),
    Case("train-metrics-exist", "train phi4.toml", (*RECIPE, "phi4/metrics.csv"),
         ("metrics.csv", "--force")),
    Case("run-output-is-file", "run phi4.toml --out file.txt", (*RECIPE, "file.txt"),
         ("file.txt",)),
    Case("bench-json-exists", f"{BENCH} --json bench.json", ("bench.json",),
         ("bench.json", "exists")),
    Case("bench-scaling-json-exists", "bench scaling --json bench.json", ("bench.json",),
         ("bench.json", "exists")),
    # ---- an unwritable output folder (a path below a regular file fails for root too)
    Case("hmc-unwritable-folder", f"{HMC} --out file.txt/x.h5", ("file.txt", *U1),
         ("file.txt",)),
    Case("sample-unwritable-folder", "sample phi4 --out file.txt/x.h5",
         ("file.txt", *PHI4_RUN), ("file.txt",)),
    Case("train-unwritable-folder", "train phi4.toml --out file.txt/run", (*RECIPE, "file.txt"),
         ("file.txt",)),
    Case("run-unwritable-folder", "run phi4.toml --out file.txt/run", (*RECIPE, "file.txt"),
         ("file.txt",)),
    Case("bench-unwritable-folder", f"{BENCH} --json file.txt/b.json", ("file.txt",),
         ("file.txt",)),
    # ---- --n 0 and negative counts
    Case("hmc-n-0", "hmc u1.card.toml --lattice 4x4 --n 0 --out x.h5", U1, ("--n",)),
    Case("hmc-n-negative", "hmc u1.card.toml --lattice 4x4 --n -3 --out x.h5", U1, ("--n",)),
    Case("hmc-chunk-0", f"{HMC} --chunk 0 --out x.h5", U1, ("--chunk",)),
    Case("sample-n-0", "sample phi4 --n 0 --out x.h5", PHI4_RUN, ("--n",)),
    Case("sample-n-negative", "sample phi4 --n -5 --out x.h5", PHI4_RUN, ("--n",)),
    Case("sample-chunk-0", "sample phi4 --chunk 0 --out x.h5", PHI4_RUN, ("--chunk",)),
    Case("train-steps-negative", "train phi4.toml --steps -1 --out new", RECIPE, ("--steps",)),
    Case("bench-batch-negative", "bench estimators --batch -1", (), ("--batch",)),
]


def _materialise(case: Case, lib: Path, root: Path) -> Path:
    folder = root / case.id
    folder.mkdir()
    for spec in case.files:
        dest, _, src = spec.partition("=")
        source, target = lib / (src or dest), folder / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    return folder


@pytest.fixture(scope="module")
def battery(server: Server, lib: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Result, dict[str, str], dict[str, str]]]:
    """Every case, run once (concurrently): id → (result, files before, files after)."""
    root = tmp_path_factory.mktemp("cases")
    folders = {case.id: _materialise(case, lib, root) for case in CASES}
    before = {case.id: snapshot(folders[case.id]) for case in CASES}
    results = server.run([(shlex.split(case.argv), folders[case.id]) for case in CASES])
    return {case.id: (result, before[case.id], snapshot(folders[case.id]))
            for case, result in zip(CASES, results, strict=True)}


def assert_one_clear_line(result: Result, code: int, names: tuple[str, ...]) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result
    assert result.rc == code, result
    lines = result.lines()
    assert len(lines) == 1, f"expected one line on stderr:\n{result}"
    line = lines[0]
    assert line.startswith("latticeflow") and "error:" in line, line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, battery) -> None:
    result, before, after = battery[case.id]
    assert_one_clear_line(result, 2, case.names)
    assert after == before, "files were changed, added or removed"


def test_every_case_kind_reaches_every_command() -> None:
    """The battery covers each command (a guard against cases silently dropped)."""
    commands = {c.argv.split()[0] for c in CASES}
    assert commands == {"run", "train", "sample", "hmc", "info", "bench"}


def test_unwritable_folder_by_permissions(server: Server, lib: Path, tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    shutil.copy2(lib / "u1.card.toml", tmp_path)
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes (the "
                        "file.txt/... cases test an unwritable folder instead)")
        before = snapshot(tmp_path)
        result = server.one(f"{HMC} --out readonly/x.h5", tmp_path)
        assert_one_clear_line(result, 2, ("readonly", "not writable"))
        assert snapshot(tmp_path) == before
    finally:
        folder.chmod(0o700)


# ------------------------------------------------------------------------------ the real script


def test_version(tmp_path: Path) -> None:
    result = real(["--version"], tmp_path)
    assert result.rc == 0, result
    assert result.stdout.strip() == f"latticeflow {latticeflow.__version__}"


REAL_CASES = {  # argv → what the one line names
    "hmc missing.toml --lattice 4x4 --n 5 --out x.h5": ("missing.toml",),
    "train missing.toml --steps -1": ("--steps",),
}


@pytest.fixture(scope="module")
def real_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Result, Path]]:
    folders = {argv: tmp_path_factory.mktemp("real") for argv in REAL_CASES}
    with ThreadPoolExecutor(len(REAL_CASES)) as pool:
        futures = {argv: pool.submit(real, shlex.split(argv), folders[argv])
                   for argv in REAL_CASES}
    return {argv: (future.result(), folders[argv]) for argv, future in futures.items()}


@pytest.mark.parametrize("argv", list(REAL_CASES))
def test_real_script_bad_input(argv: str, real_results) -> None:
    """The console script itself behaves as the fork server's children do."""
    result, folder = real_results[argv]
    assert_one_clear_line(result, 2, REAL_CASES[argv])
    assert not list(folder.iterdir())


# ------------------------------------------------------------------------------ help, logging


HELP_COMMANDS = ["", "run", "train", "sample", "hmc", "info", "bench", "bench estimators",
                 "bench scaling"]


@pytest.fixture(scope="module")
def helps(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    cwd = tmp_path_factory.mktemp("help")
    results = server.run([([*c.split(), "--help"], cwd) for c in HELP_COMMANDS])
    return dict(zip(HELP_COMMANDS, results, strict=True))


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_has_examples(command: str, helps: dict[str, Result]) -> None:
    result = helps[command]
    assert result.rc == 0 and not result.stderr, result
    assert "example" in result.stdout.lower(), result.stdout
    assert f"latticeflow {command}".strip() in result.stdout


def test_help_documents_exit_codes(helps: dict[str, Result]) -> None:
    text = helps[""].stdout
    assert "exit codes" in text
    for code in ("0", "1", "2", "130"):
        assert f"\n  {code} " in text, text


@pytest.fixture(scope="module")
def verbosity(server: Server, lib: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Result]:
    cwd = tmp_path_factory.mktemp("verbosity")
    shutil.copy2(lib / "u1.card.toml", cwd)
    flags = {"default": [], "quiet": ["-q"], "verbose": ["-v"]}
    results = server.run([([*flag, *shlex.split(HMC), "--out", f"{name}.h5"], cwd)
                          for name, flag in flags.items()])
    tty = server.run([(shlex.split(HMC) + ["--n", "30", "--chunk", "10", "--out", "tty.h5"],
                       cwd)], tty=True)
    return {**dict(zip(flags, results, strict=True)), "tty": tty[0]}


def test_default_logs_info(verbosity: dict[str, Result]) -> None:
    result = verbosity["default"]
    assert result.rc == 0, result
    assert len(result.lines()) == 1 and "default.h5: 5 rows" in result.stderr, result
    assert "creating" not in result.stderr


def test_quiet_silences_info(verbosity: dict[str, Result]) -> None:
    result = verbosity["quiet"]
    assert result.rc == 0 and result.stderr == "", result


def test_verbose_adds_debug(verbosity: dict[str, Result]) -> None:
    result = verbosity["verbose"]
    assert result.rc == 0, result
    assert "creating verbose.h5" in result.stderr and "verbose.h5: 5 rows" in result.stderr
    assert "findfont" not in result.stderr  # only latticeflow's debug output, not matplotlib's


def test_progress_bar_only_on_a_terminal(verbosity: dict[str, Result]) -> None:
    for name in ("default", "quiet", "verbose"):
        assert "\r" not in verbosity[name].stderr and "row/s" not in verbosity[name].stderr
    tty = verbosity["tty"]
    assert tty.rc == 0, tty
    assert "row/s" in tty.stderr and "30/30" in tty.stderr, tty


# ------------------------------------------------------------------------------ Ctrl-C


def n_complete(path: Path) -> int:
    """Committed rows of an ensemble, or -1 while it cannot be read (being written)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["n_complete"])
    except (OSError, KeyError):
        return -1


def interrupt(argv: list[str], cwd: Path, ready: Callable[[], bool]) -> Result:
    proc = subprocess.Popen([*LATTICEFLOW, *argv], cwd=cwd, env=ENV, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"did not stop after SIGINT: {proc.communicate()}")
    return Result(proc.returncode, stdout, stderr)


def test_interrupt_hmc_keeps_complete_rows(server: Server, lib: Path, tmp_path: Path) -> None:
    shutil.copy2(lib / "u1.card.toml", tmp_path)
    out = tmp_path / "run.h5"
    argv = [*shlex.split(HMC), "--n", "100000000", "--chunk", "20", "--out", "run.h5"]
    result = interrupt(argv, tmp_path, lambda: n_complete(out) > 0)
    assert "Traceback" not in result.stderr, result
    assert result.rc == 130, result
    assert len(result.lines()) == 1, result
    assert "interrupted" in result.stderr and "run.h5" in result.stderr and "--resume" in (
        result.stderr), result
    rows = n_complete(out)
    assert rows > 0 and rows % 20 == 0, rows
    with h5py.File(out, "r") as f:
        assert f["configs"].shape[0] >= rows and np.isfinite(f["action"][:rows]).all()
    resumed = server.one([*shlex.split(HMC), "--n", str(rows + 20), "--chunk", "20", "--out",
                          "run.h5", "--resume"], tmp_path)
    assert resumed.rc == 0, resumed
    assert f"resuming run.h5 at row {rows}" in resumed.stderr, resumed
    assert n_complete(out) == rows + 20


def test_interrupt_train_writes_checkpoint(server: Server, lib: Path, tmp_path: Path) -> None:
    for name in ("long.toml", "phi4.card.toml"):
        shutil.copy2(lib / name, tmp_path)
    metrics = tmp_path / "long" / "metrics.csv"

    def ready() -> bool:
        return metrics.exists() and len(metrics.read_text().splitlines()) > 2

    result = interrupt(["train", "long.toml"], tmp_path, ready)
    assert "Traceback" not in result.stderr, result
    assert result.rc == 130, result
    lines = result.lines()
    assert lines[-1] == "latticeflow train: interrupted; completed work has been kept", result
    assert any(re.search(r"checkpoint written to \S*long/checkpoint\.pt$", line)
               for line in lines), result
    info = server.one("info long", tmp_path)
    assert info.rc == 0, info
    step = int(next(line.split()[1] for line in info.stdout.splitlines()
                    if line.startswith("step ")))
    assert step > 0 and len(metrics.read_text().splitlines()) >= step + 1
    resumed = server.one(f"train long.toml --resume --steps {step + 2}", tmp_path)
    assert resumed.rc == 0, resumed
    assert re.search(rf"resuming \S*long/checkpoint\.pt at step {step}\n", resumed.stderr), (
        resumed)
    again = server.one("info long", tmp_path)
    assert f"{step + 2} of {step + 2}" in again.stdout, again
    assert len(metrics.read_text().splitlines()) == step + 3


# ------------------------------------------------------------------------------ NMCMC diagnostics


def test_sample_records_proposal_diagnostics(server: Server, lib: Path, tmp_path: Path) -> None:
    """--rows (the spelling for torchrun) is --n; the summary line, the file's attributes,
    `info` and the analysis header give the proposal ESS, k̂ and non-finite count."""
    from latticeflow.ensemble.proposals import read_proposal_summary
    from latticeflow.measure import analyse
    from latticeflow.script_support import ensemble_header

    shutil.copytree(lib / "phi4", tmp_path / "phi4")
    argv = "sample phi4 --rows 40 --chunk 10 --batch-size 16 --out s.h5"
    result = server.one(argv, tmp_path)
    assert result.rc == 0, result
    assert re.search(r"proposal ESS 0\.\d{3}, Pareto k̂ \S+, 0 non-finite of 40 proposals",
                     result.stderr), result
    summary = read_proposal_summary(tmp_path / "s.h5")
    assert summary.proposals == 40 and summary.nonfinite == 0 and 0 < summary.ess <= 1
    info = server.one("info s.h5", tmp_path)
    assert info.rc == 0, info
    assert re.search(rf"proposal ESS\s+{summary.ess:.4f}", info.stdout), info
    assert re.search(r"non-finite proposals\s+0", info.stdout), info
    header = ensemble_header(analyse(tmp_path / "s.h5"))
    assert f"proposal ESS {summary.ess:.6g}" in header and "nan" not in header, header


def test_sample_stops_on_non_finite_proposals(lib: Path, tmp_path: Path, monkeypatch,
                                              capsys) -> None:
    """A flow whose proposals are NaN: exit 2 with one line naming the checkpoint."""
    from latticeflow import cli
    from latticeflow.samplers.nmcmc import FlowMetropolis

    propose = FlowMetropolis._propose

    def broken(self):
        batch = propose(self)
        batch["log_q"][:] = float("nan")
        return batch

    monkeypatch.setattr(FlowMetropolis, "_propose", broken)
    # In-process: drop root handlers that earlier in-process scripts bound to since-closed
    # captured streams (logging.basicConfig in script_support.run_script).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    shutil.copytree(lib / "phi4", tmp_path / "phi4")
    checkpoint = str(tmp_path / "phi4")
    rc = cli.main(["sample", checkpoint, "--rows", "40", "--chunk", "10", "--batch-size", "16",
                   "--out", str(tmp_path / "s.h5")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert checkpoint in lines[0] and "non-finite" in lines[0], lines
