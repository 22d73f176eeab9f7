"""Training a recipe's flow into a run directory: :func:`train_run`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latticeflow.base.distributed import DistributedContext
from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe
from latticeflow.training import TrainingResult, open_trainer, train_ancestors

log = logging.getLogger("latticeflow")


@dataclass(frozen=True)
class TrainSettings:
    """How to train a recipe: into ``out`` (None: the recipe's default run directory);
    ``resume`` continues its checkpoint, ``force`` replaces it (never silently otherwise).

    ``init_from`` (run directory or checkpoint) starts from other weights; without it a fresh
    run of a recipe with ``init_from`` trains its lineage first
    (:func:`~latticeflow.training.train_ancestors`, with ``lineage_overrides`` such as the
    device). ``tf32``: see :class:`~latticeflow.training.Trainer`. ``report``: log lines before
    and after (the command). ``source``: how a message names the recipe.
    """

    out: Path | None = None
    resume: bool = False
    force: bool = False
    init_from: Path | None = None
    lineage_overrides: Mapping[str, Any] = field(default_factory=dict)
    tf32: bool = False
    report: bool = False
    source: str | None = None


def train_run(recipe: Recipe, settings: TrainSettings,
              context: DistributedContext | None = None) -> TrainingResult:
    """Train ``recipe``'s flow (data-parallel with a ``context``); see :class:`TrainSettings`."""
    s = settings
    init_from = s.init_from
    if init_from is None and recipe.init_from is not None and not s.resume:
        if context is not None:
            raise LatticeflowError(f"{s.source or recipe.source} starts from "
                                   f"{recipe.init_from}: under torchrun train that chain "
                                   f"first, or pass --init-from")
        init_from = train_ancestors(recipe, dict(s.lineage_overrides) or None)
    trainer = open_trainer(recipe, s.out, resume=s.resume, force=s.force, init_from=init_from,
                           distributed=context, tf32=s.tf32)
    if s.report and trainer.is_main:
        processes = "" if context is None else f" x {context.world_size} processes"
        log.info("training %s: %s on lattice %s, %s, %s on %s%s", recipe.name,
                 recipe.theory, "x".join(map(str, recipe.lattice)),
                 recipe.training.estimator, recipe.dtype, trainer.device, processes)
    result = trainer.train()
    if s.report and trainer.is_main:
        ess = "not measured" if result.ess is None else f"{result.ess:.4f}"
        log.info("done: step %d, final ESS %s, skipped steps %d, %.0f s of training",
                 result.step, ess, result.skipped_steps, result.wall_time)
        log.info("checkpoint: %s", result.checkpoint)
        log.info("metrics:    %s", result.metrics)
        log.info("plot:       %s", result.plot)
    return result


__all__ = ["TrainSettings", "train_run"]
