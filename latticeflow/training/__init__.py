"""Training a flow from a recipe: optimiser, schedule, checkpoints, metrics and ESS tracking.

Run directory
-------------
``checkpoint.pt`` (written atomically: temporary file + ``os.replace``), ``metrics.csv`` (one row
per step, flushed as it goes) and ``training.png`` (loss and ESS against step).

Modules
-------
* ``trainer``: the :class:`Trainer` loop (one step, ESS, checkpoints of its state, Ctrl-C,
  data-parallel ranks), its random streams, :class:`TrainingResult`, :class:`TrainingDiverged`;
  the conventions of a training run are in its docstring.
* ``rundir``: :func:`open_trainer`, the run-directory policy (resume, force, init-from).
* ``lineage``: a recipe's ``init_from`` ancestry (:func:`recipe_lineage`) and training it
  (:func:`train_ancestors`).
* ``checkpoint``: the checkpoint format, reading and validating it, :func:`load_checkpoint`
  (:class:`LoadedFlow`, for sampling), the atomic write, and the refusals of a checkpoint that
  does not fit (resuming with another recipe or number of processes, init-from another theory
  or architecture).
* ``metrics``: ``metrics.csv`` (:data:`METRIC_COLUMNS`, :func:`read_metrics`) and
  ``training.png`` (:func:`plot_metrics`).
* ``schedule``: :func:`lr_factor`, the learning-rate schedule.
* ``loss``: :class:`TrainingLoss` (flow + estimator as one module for DDP) and :class:`StepStats`.
* ``data``: the forward estimators' ensemble, checked against the recipe.
* ``runtime``: :func:`tf32_mode` (also used when sampling) and the deferred Ctrl-C.
* ``curves``: several runs' training curves compared under a common wall-clock budget.

Names with a leading underscore are shared between these modules only.
"""

from __future__ import annotations

from latticeflow.training.checkpoint import (
    CHECKPOINT_NAME,
    LoadedFlow,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint,
)
from latticeflow.training.lineage import recipe_lineage, train_ancestors
from latticeflow.training.loss import StepStats, TrainingLoss
from latticeflow.training.metrics import (
    METRIC_COLUMNS,
    METRICS_NAME,
    PLOT_NAME,
    plot_metrics,
    read_metrics,
)
from latticeflow.training.rundir import open_trainer
from latticeflow.training.runtime import tf32_mode
from latticeflow.training.schedule import lr_factor
from latticeflow.training.trainer import Trainer, TrainingDiverged, TrainingResult

__all__ = ["CHECKPOINT_NAME", "LoadedFlow", "METRICS_NAME", "METRIC_COLUMNS", "PLOT_NAME",
           "StepStats", "Trainer", "TrainingDiverged", "TrainingLoss", "TrainingResult",
           "checkpoint_path", "load_checkpoint", "lr_factor", "open_trainer", "plot_metrics",
           "read_checkpoint", "read_metrics", "recipe_lineage", "tf32_mode", "train_ancestors"]
