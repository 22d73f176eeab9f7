"""Training a flow from a recipe: optimiser, schedule, checkpoints, metrics and ESS tracking.

Run directory
-------------
``checkpoint.pt`` (written atomically: temporary file + ``os.replace``), ``metrics.csv`` (one row
per step, flushed as it goes) and ``training.png`` (loss and ESS against step).

Conventions
-----------
* ``step`` counts optimiser steps taken or skipped; the learning rate of step k (1-based) is
  ``lr · factor(k − 1)`` with a linear warm-up and an optional cosine decay to 0 at
  ``training.steps`` (:func:`lr_factor`).
* A step whose surrogate loss or any gradient is non-finite is skipped: no optimiser update, the
  step still counts (and the schedule advances). After ``max_bad_steps`` consecutive skips the run
  stops with :class:`TrainingDiverged`; weights are never updated with non-finite numbers, a
  checkpoint never holds non-finite weights, and no periodic checkpoint is written while a run
  of skipped steps is going on (the last good one stays).
* ``loss`` in the metrics is the estimator's objective (the KL estimate up to constants:
  mean(log q + S) for reverse estimators, −mean log q(x) for forward ones; with
  ``reverse_weight`` w the same mixture (1 − w)·forward + w·reverse as the loss), NaN on skipped
  steps. ``logw_std`` is the standard deviation of log w = −S − log q over the training batch.
* Randomness: the training noise (and the data minibatch indices) come from one
  ``torch.Generator`` on the device, seeded from the recipe seed. The ESS is measured on
  ``ess_batch`` fresh samples drawn from a separate generator seeded from (seed, step), so
  measuring the ESS never perturbs the training stream and a measurement is reproducible
  whatever happened before it. Weight initialisation uses a third seed derived from the recipe
  seed and leaves torch's global generator untouched.
* Resuming restores weights, optimiser and scheduler state, step, generator states and the
  elapsed time, so that a resumed run continues exactly as an uninterrupted one would (bitwise on
  the same device and dtype); ``metrics.csv`` is cut back to the checkpoint's step and continued.
* Ctrl-C (SIGINT, main thread) finishes the current step, writes a checkpoint of it and re-raises
  KeyboardInterrupt; a second Ctrl-C interrupts at once (the previous checkpoint stays intact).
* Precision: float32 convolutions and matmuls run in full IEEE precision unless the trainer is
  built with ``tf32=True`` (``latticeflow train --tf32``); see :func:`tf32_mode`.

Data-parallel training (``torchrun --nproc_per_node=K -m latticeflow.cli train RECIPE``)
--------------------------------------------------------------------------------------------
With a :class:`~latticeflow.distributed.DistributedContext` the loss module (flow + estimator,
:class:`TrainingLoss`) is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, so the
gradient of every step is the average over the K ranks. ``training.batch_size`` is the batch
*per rank*: the step's gradient is that of one batch of K·batch_size samples (each rank's
surrogate is a mean over its own batch). Every rank draws its batch from its own generator:
rank 0 uses the single-process training stream, rank r ≥ 1 one seeded from (seed, r).
Weights are initialised identically on every rank (and DDP broadcasts rank 0's anyway).
The reported loss and ``logw_std`` are those of the global batch (one all-gather per step, which
also makes every rank take the same decision on skipping a non-finite step and on Ctrl-C).
Rank 0 alone writes the checkpoint (it holds every rank's generator state and ``world_size``),
metrics and plot, shows the progress bar and measures the ESS (on ``ess_batch`` samples, while
the other ranks wait at the next gradient reduction). A run resumes with the same number of
processes only; all ranks read the checkpoint, so multi-node runs need a shared run directory.

The fast-path estimators call ``torch.autograd.grad`` on intermediate tensors during the forward
pass (one input-only VJP per layer). That does not disturb DDP: those calls ask for gradients
with respect to layer inputs only, so autograd never reaches the parameters' gradient
accumulators, where DDP's reduction hooks sit; the hooks fire only in the final ``backward``.
Every parameter receives a gradient in every estimator, so ``find_unused_parameters=False``
(tested against a single-process step on the concatenated batch in
``tests/test_distributed.py``).

Checkpoint (a dict of tensors, numbers, strings, lists and dicts: loadable with
``torch.load(weights_only=True)``): ``format = "latticeflow-checkpoint"``, ``format_version = 1``,
``latticeflow_version``, ``torch_version``, ``theory``, ``lattice`` (list), ``architecture``,
``dtype``, ``action`` (the action card), ``recipe`` (:meth:`Recipe.to_dict`), ``model``
(state_dict; lattice independent), ``optimizer``, ``scheduler``, ``step``, ``rng`` (``train``:
training generator state, ``torch``: global CPU generator, ``cuda``: current CUDA generator when
trained on CUDA), ``ess`` (last measured ESS or None), ``ess_step``, ``skipped_steps``,
``wall_time`` (seconds of training so far), ``world_size`` (number of data-parallel processes;
absent in older checkpoints: 1); with ``world_size > 1``, ``rng["train_ranks"]`` holds every
rank's training generator state.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import latticeflow
from latticeflow.config import Recipe, TrainingConfig, recipe_from_dict
from latticeflow.device import select_device, select_dtype
from latticeflow.distributed import DistributedContext, barrier, gather_objects, gather_rows
from latticeflow.ensemble import read_ensemble, sync_folder
from latticeflow.errors import LatticeflowError
from latticeflow.estimators import EstimatorOutput, get_estimator
from latticeflow.flows import Flow, build_flow
from latticeflow.locking import hold_run_dir, release_run_dir
from latticeflow.statistics import ess, running_mean
from latticeflow.theories import Action, action_from_table

log = logging.getLogger("latticeflow")

CHECKPOINT_FORMAT = "latticeflow-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
PLOT_NAME = "training.png"
#: At most one plot refresh per this many seconds at intermediate checkpoints.
PLOT_INTERVAL_S = 60.0
METRIC_COLUMNS = ("step", "loss", "ess", "logw_std", "lr", "wall_time", "skipped_steps")

#: Recipe keys that may change when resuming (they do not alter the training trajectory).
RESUMABLE_CHANGES = ("name", "device", "training.steps", "training.ess_interval",
                     "training.ess_batch", "training.checkpoint_interval",
                     "training.max_bad_steps")
_RESUMABLE_SECTIONS = ("sampling.", "analysis.")
_CHECKPOINT_KEYS = ("theory", "lattice", "architecture", "dtype", "action", "recipe", "model",
                    "optimizer", "scheduler", "step", "rng", "ess", "ess_step", "skipped_steps",
                    "wall_time")
_INIT_STREAM, _TRAIN_STREAM, _ESS_STREAM = 0, 1, 2


class TrainingDiverged(LatticeflowError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass(frozen=True)
class TrainingResult:
    """Where a training run left its files, and how it ended."""

    step: int
    ess: float | None
    skipped_steps: int
    wall_time: float
    checkpoint: Path
    metrics: Path
    plot: Path


@dataclass
class LoadedFlow:
    """A trained flow from a checkpoint, ready for sampling (``flow`` is in eval mode).

    ``lattice`` is the lattice the flow was built for (the training lattice unless another was
    asked for); ``recipe`` is the training recipe; ``sha256`` the checkpoint file's digest;
    ``last_ess`` the last ESS measured during training (on the training lattice).
    """

    flow: Flow
    action: Action
    lattice: tuple[int, ...]
    recipe: Recipe
    step: int
    sha256: str
    last_ess: float | None


# ------------------------------------------------------------------------------------------
# Checkpoint files
# ------------------------------------------------------------------------------------------


def checkpoint_path(path_or_run_dir: str | os.PathLike) -> Path:
    """The checkpoint file itself, or ``<dir>/checkpoint.pt`` for a run directory."""
    path = Path(path_or_run_dir)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Load and validate a checkpoint file (on the CPU): ``(contents, sha256 of the file)``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LatticeflowError(f"{path}: no such checkpoint") from None
    except OSError as exc:
        raise LatticeflowError(f"{path}: cannot read checkpoint ({exc})") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle means: not a (complete) checkpoint
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LatticeflowError(f"{path}: not a latticeflow checkpoint (cannot be loaded: "
                               f"{first_line})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LatticeflowError(f"{path}: not a latticeflow checkpoint (no format marker "
                               f"{CHECKPOINT_FORMAT!r})")
    version = state.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise LatticeflowError(f"{path}: checkpoint format_version {version!r} is not supported "
                               f"(this latticeflow {latticeflow.__version__} reads version "
                               f"{CHECKPOINT_VERSION})")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise LatticeflowError(f"{path}: corrupt checkpoint (missing {', '.join(missing)})")
    return state, hashlib.sha256(raw).hexdigest()


def load_checkpoint(path_or_run_dir: str | os.PathLike, device: str | torch.device | None = None,
                    lattice: tuple[int, ...] | list[int] | None = None) -> LoadedFlow:
    """The trained flow of a checkpoint (file or run directory), for sampling.

    ``device``: None → CUDA when available, else CPU. ``lattice``: rebuild the flow on another
    lattice (the weights do not depend on the lattice size; it must suit the flow's masks).
    """
    path = checkpoint_path(path_or_run_dir)
    state, digest = read_checkpoint(path)
    recipe = recipe_from_dict(state["recipe"], source=str(path))
    device = device if isinstance(device, torch.device) else select_device(device or "auto")
    target = tuple(int(n) for n in (lattice if lattice is not None else state["lattice"]))
    flow = _build(state["theory"], target, state["architecture"], state["action"], path)
    flow.to(device=device, dtype=select_dtype(state["dtype"]))
    _load_weights(flow, state["model"], path)
    return LoadedFlow(flow=flow.eval(), action=action_from_table(state["action"], str(path)),
                      lattice=target, recipe=recipe, step=int(state["step"]), sha256=digest,
                      last_ess=state["ess"])


def _build(theory: str, lattice: tuple[int, ...], architecture: dict[str, Any],
           action_params: Mapping[str, Any], source: str | os.PathLike) -> Flow:
    if theory == "u1":
        # U(1) checkpoints written before the ``prior`` key existed trained on uniform links.
        architecture = {"prior": "uniform", **architecture}
    try:
        return build_flow(theory, lattice, architecture, action_params)
    except (ValueError, TypeError) as exc:
        raise LatticeflowError(f"{source}: cannot build the {theory} flow on lattice "
                               f"{lattice}: {exc}") from None


def _load_weights(flow: Flow, model_state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        flow.load_state_dict(model_state)
    except RuntimeError as exc:
        raise LatticeflowError(f"{source}: the weights do not fit the flow "
                               f"({str(exc).splitlines()[0]})") from None


def _atomic_save(state: dict[str, Any], path: Path, kept: str) -> None:
    """Write ``state`` to a temporary file, sync it to disk and rename it to ``path``; the
    rename is synced too. A failed write (disk full, ...) leaves ``path`` as it was and raises
    :class:`LatticeflowError`, whose message ends with ``kept`` (what remains, what to do)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # torch's zip writer raises RuntimeError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
                " ".join(str(exc).split()))
            raise LatticeflowError(f"{path}: writing the checkpoint failed ({reason}); "
                                   f"{kept}") from None
        sync_folder(path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# Schedule, seeds, interrupts
# ------------------------------------------------------------------------------------------


def lr_factor(index: int, config: TrainingConfig) -> float:
    """Learning-rate multiplier of optimiser step ``index`` (0-based).

    Linear warm-up (index + 1)/warmup_steps for index < warmup_steps; then 1 (constant) or
    ½(1 + cos(π t)) with t = (index − warmup)/(steps − warmup) going from 0 to 1 (cosine).
    """
    warmup = config.warmup_steps
    if index < warmup:
        return (index + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min((index - warmup) / max(config.steps - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _derived_seed(*key: int) -> int:
    """A 64-bit seed for the stream named by ``key`` (e.g. recipe seed, stream id, step)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def _train_seed(seed: int, rank: int) -> int:
    """Seed of the training stream of ``rank``: rank 0 has the single-process stream."""
    if rank == 0:
        return _derived_seed(seed, _TRAIN_STREAM)
    return _derived_seed(seed, _TRAIN_STREAM, rank)


class _DeferredInterrupt:
    """Within the context a first SIGINT only sets :attr:`requested` (checked between steps);
    a second one raises KeyboardInterrupt at once. Outside the main thread: no effect."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("interrupt: finishing the current step and writing a checkpoint "
                    "(Ctrl-C again to abort at once)")

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------------------
# Metrics and plot
# ------------------------------------------------------------------------------------------


def _format(value: float | int | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.8g}"


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to ``last_step`` (rows after a checkpoint are redone)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != METRIC_COLUMNS:
        raise LatticeflowError(f"{path}: not a latticeflow metrics file (unexpected header)")
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a ``metrics.csv`` as float arrays (blank → NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: np.array([float(r[c]) if r[c] else np.nan for r in rows]) for c in METRIC_COLUMNS}


def plot_metrics(metrics: str | os.PathLike, out: str | os.PathLike, title: str = "") -> None:
    """``training.png``: loss (raw and running mean) and ESS against step."""
    m = read_metrics(metrics)
    fig = Figure(figsize=(8, 6), layout="constrained")
    loss_ax, ess_ax = fig.subplots(2, 1, sharex=True)
    step, loss = m["step"], m["loss"]
    loss_ax.plot(step, loss, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    window = max(1, len(loss) // 50)
    if window > 1 and np.isfinite(loss).sum() >= window:
        smooth = running_mean(loss, window)
        loss_ax.plot(step[window - 1:], smooth, color="tab:blue", lw=1.5,
                     label=f"mean of {window} steps")
        loss_ax.legend(loc="upper right")
        finite = smooth[np.isfinite(smooth)]
        if finite.size:  # keep the early transient from flattening the rest
            low, high = np.percentile(finite, [0, 98])
            pad = 0.1 * (high - low) or 1.0
            loss_ax.set_ylim(low - pad, high + pad)
    loss_ax.set_ylabel("loss (KL estimate + const)")
    loss_ax.grid(alpha=0.3)
    measured = np.isfinite(m["ess"])
    ess_ax.plot(step[measured], m["ess"][measured], "o-", color="tab:green", ms=3)
    ess_ax.set_ylim(0.0, 1.02)
    ess_ax.set_ylabel("ESS / N")
    ess_ax.set_xlabel("training step")
    ess_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=110)


class _MetricsLog:
    """Appends rows to ``metrics.csv`` (header first in a new file), flushed row by row; a no-op
    unless ``active`` (ranks other than 0)."""

    def __init__(self, path: Path, active: bool):
        self._file = None
        if active:
            new_file = not path.exists()
            self._file = open(path, "a", newline="")
            self._writer = csv.writer(self._file)
            if new_file:
                self._writer.writerow(METRIC_COLUMNS)

    def write(self, *row: float | int | None) -> None:
        if self._file is not None:
            self._writer.writerow([_format(v) for v in row])
            self._file.flush()

    def __enter__(self) -> _MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


# ------------------------------------------------------------------------------------------
# Precision, the loss module, step statistics
# ------------------------------------------------------------------------------------------


@contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Within the block, float32 CUDA matmuls and cuDNN convolutions use TF32 (``enabled``) or
    full IEEE float32 (not ``enabled``); the previous settings are restored afterwards.

    PyTorch's own default lets cuDNN convolutions use TF32, so sampling wraps its work in
    ``tf32_mode(False)``: the log-densities that enter accept/reject are never TF32. No effect on
    the CPU.
    """
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


class TrainingLoss(nn.Module):
    """The training loss of a batch as a module, so that DDP's forward wraps the estimator.

    ``forward(batch, reverse_noise)`` returns ``(loss to backprop, objective, log w)``; with
    ``reverse_noise`` (forward estimators with ``reverse_weight`` w > 0) the loss and objective
    are (1 − w)·main + w·(reverse-fastpath on the noise), and log w is the main estimator's.
    """

    def __init__(self, flow: Flow, action: Action,
                 estimator: Callable[[Flow, Action, Tensor], EstimatorOutput],
                 reverse_term: Callable[[Flow, Action, Tensor], EstimatorOutput],
                 reverse_weight: float):
        super().__init__()
        self.flow, self.action = flow, action
        self.estimator, self.reverse_term = estimator, reverse_term
        self.reverse_weight = reverse_weight

    def forward(self, batch: Tensor, reverse_noise: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.estimator(self.flow, self.action, batch)
        if reverse_noise is None:
            return out.surrogate, out.objective, out.log_weight
        w = self.reverse_weight
        reverse = self.reverse_term(self.flow, self.action, reverse_noise)
        return ((1 - w) * out.surrogate + w * reverse.surrogate,
                (1 - w) * out.objective + w * reverse.objective, out.log_weight)


@dataclass
class StepStats:
    """One step as reported (the same on every rank): ``loss`` (the objective of the global
    batch) and ``logw_std`` are NaN when the step is skipped; ``grad_norm`` is the norm of the
    (rank-averaged) gradient; ``interrupt``: some rank has a pending Ctrl-C."""

    loss: float
    logw_std: float
    finite: bool
    grad_norm: Tensor
    interrupt: bool


# ------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------


class Trainer:
    """Trains the flow of ``recipe`` in ``run_dir``; see the module docstring for conventions.

    Construction validates everything (device, ensemble data) and builds the flow, optimiser
    and scheduler; use :func:`open_trainer` for the run-directory policy (no silent overwrite,
    resume, init-from). ``device`` overrides the recipe's. Forward estimators keep the whole
    ensemble's configurations on the device and draw minibatches (with replacement) from it.
    ``distributed``: this rank of a data-parallel run (its device replaces ``device``); every
    rank must then make the same calls. ``tf32``: allow TF32 during :meth:`train` (CUDA only).
    """

    def __init__(self, recipe: Recipe, run_dir: str | os.PathLike, *,
                 device: str | torch.device | None = None,
                 distributed: DistributedContext | None = None, tf32: bool = False):
        self.recipe, self.config = recipe, recipe.training
        self.run_dir = Path(run_dir)
        self.distributed, self.tf32 = distributed, tf32
        if distributed is not None:
            self.device = distributed.device
        else:
            self.device = (device if isinstance(device, torch.device)
                           else select_device(device or recipe.device))
        self.dtype = select_dtype(recipe.dtype)
        self.action = recipe.action()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derived_seed(recipe.seed, _INIT_STREAM))
            flow = _build(recipe.theory, recipe.lattice, recipe.architecture_dict(),
                          recipe.action_card, recipe.source)
        self.flow = flow.to(device=self.device, dtype=self.dtype)
        self.estimator = get_estimator(self.config.estimator)
        self.reverse_term = get_estimator("reverse-fastpath")
        self.data = self._load_data() if self.config.direction == "forward" else None
        loss = TrainingLoss(self.flow, self.action, self.estimator, self.reverse_term,
                            self.config.reverse_weight)
        # Masks are the only buffers and never change: no per-step buffer broadcast.
        self.model: nn.Module = loss if distributed is None else DistributedDataParallel(
            loss, device_ids=[self.device] if self.device.type == "cuda" else None,
            forward_sync_buffers=False)
        optimizer = torch.optim.AdamW if self.config.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(self.flow.parameters(), lr=self.config.lr,
                                   weight_decay=self.config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda index: lr_factor(index, self.config))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(_train_seed(recipe.seed, self.rank))
        self.step = 0
        self.skipped_steps = 0
        self.last_ess: float | None = None
        self.last_ess_step: int | None = None
        self.wall_time = 0.0
        self.checkpoint_step: int | None = None
        self._interrupt: _DeferredInterrupt | None = None
        self._holds_run_dir = False

    # ------------------------------------------------------------------ ranks and paths
    @property
    def rank(self) -> int:
        return 0 if self.distributed is None else self.distributed.rank

    @property
    def world_size(self) -> int:
        return 1 if self.distributed is None else self.distributed.world_size

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files (the only one in a single-process run)."""
        return self.rank == 0

    @property
    def checkpoint_file(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / METRICS_NAME

    @property
    def plot_file(self) -> Path:
        return self.run_dir / PLOT_NAME

    # ------------------------------------------------------------------ setup
    def _load_data(self) -> torch.Tensor:
        """The ensemble's configurations on the device, after checking they fit the recipe."""
        path = self.config.data
        ensemble = read_ensemble(path)
        meta = ensemble.metadata
        problems = []
        if meta.theory != self.recipe.theory:
            problems.append(f"theory {meta.theory!r} (recipe: {self.recipe.theory!r})")
        if meta.lattice != self.recipe.lattice:
            problems.append(f"lattice {list(meta.lattice)} (recipe: {list(self.recipe.lattice)})")
        else:
            try:
                card = action_from_table(dict(meta.action_params), f"{path}: action_params").card()
            except LatticeflowError as exc:
                raise LatticeflowError(f"{path}: unusable action parameters: {exc}") from None
            if card != dict(self.recipe.action_card):
                problems.append(f"action {card} (recipe: {dict(self.recipe.action_card)})")
        if problems:
            raise LatticeflowError(f"training data {path} does not match the recipe: "
                                   + "; ".join(problems))
        if len(ensemble) == 0:
            raise LatticeflowError(f"training data {path} holds no configurations")
        configs = torch.as_tensor(ensemble["configs"])
        expected = self.action.field_shape(self.recipe.lattice)
        if tuple(configs.shape[1:]) != tuple(expected):
            raise LatticeflowError(f"training data {path}: configurations have shape "
                                   f"{tuple(configs.shape[1:])}, expected {tuple(expected)}")
        log.info("training data: %d configurations from %s", len(configs), path)
        return configs.to(device=self.device, dtype=self.dtype)

    def init_from(self, path: str | os.PathLike) -> None:
        """Start from the weights of another run (same theory and architecture; any lattice)."""
        path = checkpoint_path(path)
        state, _ = read_checkpoint(path)
        if state["theory"] != self.recipe.theory:
            raise LatticeflowError(f"--init-from {path}: the checkpoint is a {state['theory']} "
                                   f"flow, the recipe trains a {self.recipe.theory} flow")
        ours = self.recipe.architecture_dict()
        if state["architecture"] != ours:
            diff = ", ".join(f"{k}: {state['architecture'].get(k)!r} vs {ours.get(k)!r}"
                             for k in sorted(set(ours) | set(state["architecture"]))
                             if state["architecture"].get(k) != ours.get(k))
            raise LatticeflowError(f"--init-from {path}: architecture differs from the "
                                   f"recipe's [flow] ({diff})")
        _load_weights(self.flow, state["model"], path)
        if state["action"] != dict(self.recipe.action_card):
            log.info("initialising from a flow trained for %s", state["action"])
        log.info("initialised weights from %s (step %d, lattice %s)", path, state["step"],
                 state["lattice"])

    def resume(self) -> None:
        """Restore the full training state from ``run_dir/checkpoint.pt``."""
        state, _ = read_checkpoint(self.checkpoint_file)
        conflicts = _resume_conflicts(state["recipe"], self.recipe.to_dict())
        if conflicts:
            raise LatticeflowError(
                f"cannot resume {self.checkpoint_file}: the recipe differs from the one it was "
                f"trained with in {'; '.join(conflicts)}. Use --force to start over, or "
                f"--init-from with a new output directory to start from its weights")
        trained_with = int(state.get("world_size", 1))
        if trained_with != self.world_size:
            raise LatticeflowError(
                f"cannot resume {self.checkpoint_file}: it was trained with {trained_with} "
                f"process(es) and this run has {self.world_size}; the per-rank random streams "
                f"and the global batch would differ. Resume with the same number of processes "
                f"(torchrun --nproc_per_node={trained_with}), or start a new run from its "
                f"weights with --init-from")
        _load_weights(self.flow, state["model"], self.checkpoint_file)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                  strict=True):  # the schedule of this recipe from here on
            group["lr"] = base_lr * lr_factor(self.scheduler.last_epoch, self.config)
        self.generator.set_state(state["rng"]["train_ranks"][self.rank]
                                 if self.distributed is not None else state["rng"]["train"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = self.checkpoint_step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.last_ess, self.last_ess_step = state["ess"], state["ess_step"]
        self.wall_time = float(state["wall_time"])
        if self.is_main:
            _truncate_metrics(self.metrics_file, self.step)
            log.info("resuming %s at step %d", self.checkpoint_file, self.step)

    # ------------------------------------------------------------------ one step
    def draw_batch(self) -> tuple[Tensor, Tensor | None]:
        """This rank's next training batch from its generator: ``(batch, reverse_noise)``.

        Reverse estimators: ``batch_size`` base samples and no reverse noise. Forward ones:
        ``batch_size`` configurations drawn (with replacement) from the data, and base noise for
        the reverse term when ``reverse_weight > 0`` (else None).
        """
        n = self.config.batch_size
        if self.data is None:
            return self.flow.sample_prior(n, generator=self.generator), None
        index = torch.randint(len(self.data), (n,), generator=self.generator,
                              device=self.device)
        if self.config.reverse_weight == 0.0:
            return self.data[index], None
        return self.data[index], self.flow.sample_prior(n, generator=self.generator)

    def backward(self, batch: Tensor, reverse_noise: Tensor | None = None, *,
                 interrupt: bool = False) -> StepStats:
        """Loss and backward pass of one batch; the gradient (averaged over the ranks under DDP)
        is left in the parameters' ``.grad``. ``interrupt``: this rank has a pending Ctrl-C.

        The statistics of all ranks are gathered in one collective and brought to the host in
        one transfer, so every rank returns the same :class:`StepStats`.
        """
        loss, objective, log_weight = self.model(batch, reverse_noise)
        loss.backward()
        norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.flow.parameters() if p.grad is not None])
        dtype = loss.dtype
        head = torch.stack([loss.detach(), objective.to(dtype), norm.to(dtype),
                            torch.full((), float(interrupt), dtype=dtype, device=loss.device)])
        local = torch.cat([head, log_weight.to(dtype)])
        table = (local[None] if self.distributed is None else gather_rows(local)).double()
        values = table.cpu().numpy()   # one device → host transfer per step
        finite = bool(np.isfinite(values[:, 0]).all() and math.isfinite(values[0, 2]))
        return StepStats(
            loss=float(values[:, 1].mean()) if finite else math.nan,
            logw_std=float(values[:, 4:].std(ddof=1)) if finite else math.nan,
            finite=finite, grad_norm=norm, interrupt=bool(values[:, 3].any()))

    def _train_step(self) -> StepStats:
        self.flow.train()
        self.optimizer.zero_grad(set_to_none=True)
        interrupt = self._interrupt is not None and self._interrupt.requested
        stats = self.backward(*self.draw_batch(), interrupt=interrupt)
        if stats.finite:
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(
                    [p for p in self.flow.parameters() if p.grad is not None],
                    self.config.grad_clip, stats.grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return stats

    @torch.no_grad()
    def measure_ess(self) -> float:
        """ESS/N of ``ess_batch`` fresh samples, from a generator seeded by (seed, step)."""
        self.flow.eval()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_derived_seed(self.recipe.seed, _ESS_STREAM, self.step))
        log_w = []
        remaining = self.config.ess_batch
        while remaining > 0:
            n = min(remaining, self.config.batch_size)
            x, log_q = self.flow.sample(n, generator=generator)
            log_w.append(-(self.action(x) + log_q))
            remaining -= n
        value = ess(torch.cat(log_w).double().cpu().numpy())
        self.last_ess, self.last_ess_step = value, self.step
        return value

    # ------------------------------------------------------------------ persistence
    def save_checkpoint(self) -> None:
        """Write the full training state atomically (refusing non-finite weights).

        Under DDP every rank must call it (the ranks' generator states are gathered); rank 0
        writes the file.
        """
        finite = torch.stack([torch.isfinite(p).all() for p in self.flow.parameters()]).all()
        if not bool(finite):  # one host sync
            raise TrainingDiverged(f"refusing to write non-finite weights to "
                                   f"{self.checkpoint_file}")
        rng: dict[str, Any] = {"train": self.generator.get_state(),
                               "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.distributed is not None:
            rng["train_ranks"] = gather_objects(self.generator.get_state())
        if self.is_main:
            _atomic_save({
                "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "latticeflow_version": latticeflow.__version__,
                "torch_version": str(torch.__version__),
                "theory": self.recipe.theory, "lattice": list(self.recipe.lattice),
                "architecture": self.recipe.architecture_dict(), "dtype": self.recipe.dtype,
                "action": self.action.card(), "recipe": self.recipe.to_dict(),
                "model": self.flow.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": rng,
                "ess": self.last_ess, "ess_step": self.last_ess_step,
                "skipped_steps": self.skipped_steps, "wall_time": self.wall_time,
                "world_size": self.world_size,
            }, self.checkpoint_file, self._kept_message())
            log.debug("checkpoint at step %d: %s", self.step, self.checkpoint_file)
        self.checkpoint_step = self.step

    def _kept_message(self) -> str:
        """What a failed checkpoint write leaves, and what to do."""
        if self.checkpoint_step is None:
            return "no checkpoint of this run was written yet; free space, then train again"
        return (f"the previous checkpoint (step {self.checkpoint_step}) is intact; free space, "
                f"then `--resume`")

    def write_plot(self) -> None:
        lattice = "x".join(map(str, self.recipe.lattice))
        plot_metrics(self.metrics_file, self.plot_file,
                     f"{self.recipe.name}: {self.action!r}, lattice {lattice}")

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainingResult:
        """Train up to ``training.steps`` (total); returns where everything was written.

        Under DDP every rank calls it; rank 0 alone writes files, logs and shows progress.
        """
        total = self.config.steps
        if self.is_main and not self._holds_run_dir:  # a new run directory: claim it now
            self.hold_run_dir()
            if self.checkpoint_step is None and self.checkpoint_file.exists():
                raise LatticeflowError(f"{self.checkpoint_file} appeared while this run was "
                                       f"starting; use --resume or --force")
        try:
            return self._train(total)
        finally:
            self.release_run_dir()

    def hold_run_dir(self) -> None:
        """Become the one process training in the run directory (created if missing), or raise
        :class:`~latticeflow.locking.InUseError`; :meth:`train` lets go when it ends."""
        hold_run_dir(self.run_dir)
        self._holds_run_dir = True

    def release_run_dir(self) -> None:
        if self._holds_run_dir:
            release_run_dir(self.run_dir)
            self._holds_run_dir = False

    def _train(self, total: int) -> TrainingResult:
        if self.step >= total and self.checkpoint_step == self.step:
            if self.is_main:
                log.info("already at step %d of %d: nothing to train", self.step, total)
            return self._result()
        with tf32_mode(self.tf32), ExitStack() as stack:
            if self.step == 0 and self.last_ess is None and self.is_main:
                log.info("initial ESS: %.4f", self.measure_ess())
            self._interrupt = stack.enter_context(_DeferredInterrupt())
            stack.callback(setattr, self, "_interrupt", None)
            metrics = stack.enter_context(_MetricsLog(self.metrics_file, self.is_main))
            stack.enter_context(logging_redirect_tqdm())
            bar = stack.enter_context(tqdm(
                total=total, initial=self.step, dynamic_ncols=True, unit="step",
                disable=not (self.is_main and sys.stderr.isatty())))
            self._loop(total, metrics, bar)
        return self._result()

    def _loop(self, total: int, metrics: _MetricsLog, bar: tqdm) -> None:
        bad_streak, last_plot = 0, time.monotonic()
        while self.step < total:
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            stats = self._train_step()
            self.step += 1
            if stats.finite:
                bad_streak = 0
            else:
                bad_streak += 1
                self.skipped_steps += 1
                if self.is_main:
                    log.warning("step %d: non-finite loss or gradient; step skipped "
                                "(%d in a row)", self.step, bad_streak)
            measured = None
            if self.is_main and (self.step % self.config.ess_interval == 0
                                 or self.step == total):
                measured = self.measure_ess()
            self.wall_time += time.perf_counter() - started
            metrics.write(self.step, stats.loss, measured, stats.logw_std, lr, self.wall_time,
                          self.skipped_steps)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4g}", ess=_format_ess(self.last_ess))
            if measured is not None:
                log.info("step %d/%d  loss %.5g  ESS %.4f  lr %.3g  skipped %d  (%.0f s)",
                         self.step, total, stats.loss, measured, lr, self.skipped_steps,
                         self.wall_time)
            if bad_streak >= self.config.max_bad_steps:
                self._plot()
                raise TrainingDiverged(self._divergence_message(bad_streak))
            if (self.step % self.config.checkpoint_interval == 0 and bad_streak == 0
                    or self.step == total):
                self.save_checkpoint()
                if self.step == total or time.monotonic() - last_plot > PLOT_INTERVAL_S:
                    self._plot()
                    last_plot = time.monotonic()
            # Ranks must stop at the same step: under DDP only the gathered flag counts.
            if stats.interrupt if self.distributed is not None else self._interrupt.requested:
                if self.checkpoint_step != self.step:
                    self.save_checkpoint()
                self._plot()
                if self.is_main:
                    log.warning("interrupted at step %d; checkpoint written to %s", self.step,
                                self.checkpoint_file)
                raise KeyboardInterrupt
        if self.checkpoint_step != self.step:  # training.steps = 0
            self.save_checkpoint()
            self._plot()

    def _plot(self) -> None:
        if self.is_main:
            self.write_plot()

    def _divergence_message(self, streak: int) -> str:
        kept = (f"the last good checkpoint {self.checkpoint_file} (step {self.checkpoint_step}) "
                f"is intact" if self.checkpoint_step is not None
                else "no checkpoint had been written yet")
        return (f"training stopped at step {self.step}: {streak} consecutive steps had a "
                f"non-finite loss or gradient; {kept}. Try a smaller training.lr, "
                f"training.grad_clip, or dtype = \"float64\"")

    def _result(self) -> TrainingResult:
        return TrainingResult(step=self.step, ess=self.last_ess, skipped_steps=self.skipped_steps,
                              wall_time=self.wall_time, checkpoint=self.checkpoint_file,
                              metrics=self.metrics_file, plot=self.plot_file)


def _format_ess(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "action":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resume_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Recipe keys that differ and would change the training trajectory."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    return [f"{key} ({old_flat.get(key)!r} → {new_flat.get(key)!r})"
            for key in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(key) != new_flat.get(key) and key not in RESUMABLE_CHANGES
            and not key.startswith(_RESUMABLE_SECTIONS)]


def _check_creatable(run_dir: Path) -> None:
    """The run directory exists, or its nearest existing ancestor is a writable directory."""
    for folder in (run_dir, *run_dir.absolute().parents):
        if folder.exists():
            if not folder.is_dir():
                raise LatticeflowError(f"output directory {run_dir}: {folder} is not a "
                                       f"directory")
            if folder != run_dir and not os.access(folder, os.W_OK | os.X_OK):
                raise LatticeflowError(f"output directory {run_dir}: {folder} is not writable")
            return


def open_trainer(recipe: Recipe, run_dir: str | os.PathLike | None = None, *,
                 resume: bool = False, force: bool = False,
                 init_from: str | os.PathLike | None = None,
                 device: str | torch.device | None = None,
                 distributed: DistributedContext | None = None, tf32: bool = False) -> Trainer:
    """A :class:`Trainer` for ``run_dir`` (default ``recipe.default_run_dir()``), ready to train.

    An existing checkpoint is never replaced unless ``resume`` (continue from it) or ``force``
    (delete the run's checkpoint, metrics and plot and start over). ``init_from`` starts a new
    run from the weights of another checkpoint (e.g. trained on a smaller lattice).
    ``distributed`` and ``tf32``: see :class:`Trainer`; under DDP every rank calls this, rank 0
    alone deletes files, and all ranks leave together.
    """
    run_dir = Path(run_dir) if run_dir is not None else recipe.default_run_dir()
    existing = run_dir / CHECKPOINT_NAME
    if resume and force:
        raise LatticeflowError("--resume and --force exclude each other")
    if resume and init_from is not None:
        raise LatticeflowError("--resume continues a run from its own checkpoint; it cannot be "
                               "combined with --init-from")
    if resume and not existing.exists():
        raise LatticeflowError(f"cannot resume: {existing} does not exist")
    if existing.exists() and not (resume or force):
        raise LatticeflowError(f"{existing} already exists; use --resume to continue that run "
                               f"or --force to start over (or --out for another directory)")
    if run_dir.exists() and not run_dir.is_dir():
        raise LatticeflowError(f"output directory {run_dir} is a file")
    _check_creatable(run_dir)
    # An existing run directory is claimed before anything in it is read or deleted; a new one
    # when training starts (Trainer.train).
    claim = (distributed is None or distributed.is_main) and run_dir.is_dir()
    if claim:
        hold_run_dir(run_dir)
    try:
        trainer = Trainer(recipe, run_dir, device=device, distributed=distributed, tf32=tf32)
        trainer._holds_run_dir = claim
        _prepare_run_dir(trainer, resume=resume, force=force, init_from=init_from)
    except BaseException:
        if claim:
            release_run_dir(run_dir)
        raise
    if distributed is not None:
        barrier()  # every rank has read and checked the run directory before rank 0 writes
    return trainer


def _prepare_run_dir(trainer: Trainer, *, resume: bool, force: bool,
                     init_from: str | os.PathLike | None) -> None:
    """The start of :func:`open_trainer`'s run: weights from elsewhere, resumed, or the old
    run's files removed (``force``)."""
    run_dir = trainer.run_dir
    if init_from is not None:
        trainer.init_from(init_from)
    if resume:
        trainer.resume()
    elif force:
        for name in (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME):
            if trainer.is_main and (run_dir / name).exists():
                log.info("--force: removing %s", run_dir / name)
                (run_dir / name).unlink()
    elif (run_dir / METRICS_NAME).exists():
        raise LatticeflowError(f"{run_dir / METRICS_NAME} exists without a checkpoint; use "
                               f"--force to start over")


__all__ = ["CHECKPOINT_NAME", "LoadedFlow", "METRICS_NAME", "PLOT_NAME", "StepStats", "Trainer",
           "TrainingDiverged", "TrainingLoss", "TrainingResult", "checkpoint_path",
           "load_checkpoint", "lr_factor", "open_trainer", "plot_metrics", "read_checkpoint",
           "read_metrics", "tf32_mode"]

