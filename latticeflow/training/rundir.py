"""The run-directory policy of a training run: :func:`open_trainer`.

An existing checkpoint is never replaced silently: ``--resume`` continues it, ``--force``
deletes the run's checkpoint, metrics and plot first, ``--init-from`` starts a new run from
another run's weights. The run directory is claimed (:mod:`latticeflow.base.locking`) before
anything in it is read or deleted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from latticeflow.base.distributed import DistributedContext, barrier
from latticeflow.base.errors import LatticeflowError
from latticeflow.base.locking import hold_run_dir, release_run_dir
from latticeflow.config import Recipe
from latticeflow.training.checkpoint import CHECKPOINT_NAME
from latticeflow.training.metrics import METRICS_NAME, PLOT_NAME
from latticeflow.training.trainer import Trainer

log = logging.getLogger("latticeflow")


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




__all__ = ["open_trainer"]
