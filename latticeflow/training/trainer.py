"""The training loop: optimiser, schedule, checkpoints, metrics and ESS tracking of one run.

Where the rest lives: :mod:`~latticeflow.training.rundir` (:func:`open_trainer`, the
run-directory policy), :mod:`~latticeflow.training.checkpoint` (the file format),
:mod:`~latticeflow.training.metrics` (``metrics.csv``, ``training.png``),
:mod:`~latticeflow.training.schedule`, :mod:`~latticeflow.training.loss` and
:mod:`~latticeflow.training.runtime` (TF32, Ctrl-C). The files of a run directory are listed in
:mod:`latticeflow.training`.

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

Data-parallel training (``torchrun --nproc_per_node=K -m latticeflow.cli train RECIPE``)
--------------------------------------------------------------------------------------------
With a :class:`~latticeflow.base.distributed.DistributedContext` the loss module (flow + estimator,
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
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import latticeflow
from latticeflow.base.device import select_device, select_dtype
from latticeflow.base.distributed import DistributedContext, gather_objects, gather_rows
from latticeflow.base.errors import LatticeflowError
from latticeflow.base.locking import hold_run_dir, release_run_dir
from latticeflow.config import Recipe
from latticeflow.estimators import get_estimator
from latticeflow.flows.compile import compile_couplings
from latticeflow.statistics import ess
from latticeflow.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    atomic_save,
    build_checkpoint_flow,
    check_init_from,
    check_resumable,
    checkpoint_path,
    initial_weights,
    load_weights,
    read_checkpoint,
)
from latticeflow.training.data import load_training_data
from latticeflow.training.loss import StepStats, TrainingLoss
from latticeflow.training.metrics import (
    METRICS_NAME,
    PLOT_INTERVAL_S,
    PLOT_NAME,
    _format_ess,
    _MetricsLog,
    _truncate_metrics,
    plot_metrics,
)
from latticeflow.training.runtime import _DeferredInterrupt, tf32_mode, warm_up_compiled
from latticeflow.training.schedule import lr_factor

log = logging.getLogger("latticeflow")

_INIT_STREAM, _TRAIN_STREAM, _ESS_STREAM, _COMPILE_STREAM = 0, 1, 2, 3


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


def _derived_seed(*key: int) -> int:
    """A 64-bit seed for the stream named by ``key`` (e.g. recipe seed, stream id, step)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def _train_seed(seed: int, rank: int) -> int:
    """Seed of the training stream of ``rank``: rank 0 has the single-process stream."""
    if rank == 0:
        return _derived_seed(seed, _TRAIN_STREAM)
    return _derived_seed(seed, _TRAIN_STREAM, rank)


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
            flow = build_checkpoint_flow(recipe.theory, recipe.lattice, recipe.architecture_dict(),
                          recipe.action_card, recipe.source)
        self.flow = flow.to(device=self.device, dtype=self.dtype)
        if self.config.compile:
            compile_couplings(self.flow)
        self.compile_seconds: float | None = None
        self.estimator = get_estimator(self.config.estimator)
        self.reverse_term = get_estimator("reverse-fastpath")
        self.data = (load_training_data(recipe, self.action, self.device, self.dtype)
                     if self.config.direction == "forward" else None)
        # A heat-bath flow trains against the odd sites' marginal; its samples (ESS, NMCMC)
        # are complete configurations of the theory itself.
        loss = TrainingLoss(self.flow, self.flow.training_target(self.action), self.estimator,
                            self.reverse_term, self.config.reverse_weight)
        # The buffers (masks, the device anchor) never change: no per-step buffer broadcast.
        # A flow without parameters (the base alone, trained for 0 steps) needs no DDP.
        parameters = list(self.flow.parameters())
        self.model: nn.Module = loss if distributed is None or not parameters else (
            DistributedDataParallel(loss, device_ids=[self.device] if self.device.type == "cuda"
                                    else None, forward_sync_buffers=False))
        optimizer = torch.optim.AdamW if self.config.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer([{"params": parameters}], lr=self.config.lr,
                                   weight_decay=self.config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda index: lr_factor(index, self.config))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(_train_seed(recipe.seed, self.rank))
        self.step = 0
        self.skipped_steps = 0
        self.last_ess: float | None = None
        self.last_ess_step: int | None = None
        self.started_fresh = False  # the floor rejected the init_from weights
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
    def init_from(self, path: str | os.PathLike) -> None:
        """Start from the weights of another run (same theory and architecture, or the same with
        coarse levels added; any lattice), unless the floor (``training.init_floor``) finds this
        recipe's own start better."""
        path = checkpoint_path(path)
        state, _ = read_checkpoint(path)
        check_init_from(state, self.recipe, path)
        fresh = {k: v.clone() for k, v in self.flow.state_dict().items()}
        load_weights(self.flow, initial_weights(state, self.recipe, fresh), path)
        if state["action"] != dict(self.recipe.action_card):
            log.info("initialising from a flow trained for %s", state["action"])
        if self.config.init_floor and not self.apply_init_floor(fresh):
            self.started_fresh = True
            return
        log.info("initialised weights from %s (step %d, lattice %s)", path, state["step"],
                 state["lattice"])

    def apply_init_floor(self, fresh: dict[str, Tensor]) -> bool:
        """The floor (``training.init_floor``): keep the inherited weights when their ESS is at
        least that of ``fresh`` (this recipe's own start), else load ``fresh``. Both ESS come
        from the same ``ess_batch`` fresh-sample stream. Under DDP rank 0 measures and decides,
        and every rank loads the weights it chose."""
        inherited = {k: v.clone() for k, v in self.flow.state_dict().items()}
        keep = None
        if self.is_main:
            inherited_ess = self.measure_ess()
            self.flow.load_state_dict(fresh)
            fresh_ess = self.measure_ess()
            keep = math.isnan(fresh_ess) or inherited_ess >= fresh_ess
            if keep:
                self.last_ess = inherited_ess
            log.info("inherited ESS %.4f %s fresh-start ESS %.4f: starting %s", inherited_ess,
                     "≥" if keep else "<", fresh_ess,
                     "from the inherited weights" if keep else
                     "fresh (the floor, training.init_floor)")
        if self.distributed is not None:
            keep = gather_objects(keep)[0]
        self.flow.load_state_dict(inherited if keep else fresh)
        return bool(keep)

    def resume(self) -> None:
        """Restore the full training state from ``run_dir/checkpoint.pt``."""
        state, _ = read_checkpoint(self.checkpoint_file)
        check_resumable(state, self.recipe, self.world_size, self.checkpoint_file)
        load_weights(self.flow, state["model"], self.checkpoint_file)
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
        self.started_fresh = bool(state.get("started_fresh", False))
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
        finite = [torch.isfinite(p).all() for p in self.flow.parameters()]
        if finite and not bool(torch.stack(finite).all()):  # one host sync
            raise TrainingDiverged(f"refusing to write non-finite weights to "
                                   f"{self.checkpoint_file}")
        rng: dict[str, Any] = {"train": self.generator.get_state(),
                               "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.distributed is not None:
            rng["train_ranks"] = gather_objects(self.generator.get_state())
        if self.is_main:
            atomic_save({
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
                "world_size": self.world_size, "started_fresh": self.started_fresh,
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
        :class:`~latticeflow.base.locking.InUseError`; :meth:`train` lets go when it ends."""
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
            if self.config.compile and self.compile_seconds is None:
                self.compile_seconds = warm_up_compiled(
                    self, _derived_seed(self.recipe.seed, _COMPILE_STREAM))
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


__all__ = ["Trainer", "TrainingDiverged", "TrainingResult"]
