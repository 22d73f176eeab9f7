"""The Python API: what the ``latticeflow`` command does, as functions for scripts and notebooks.

Everything here is re-exported at the top level (``import latticeflow as lf``; see
docs/python-api.md for a walk-through). The names follow the command's vocabulary:

* :func:`load_action` (an action card), :func:`load_recipe` (a run recipe);
* :func:`train` (``latticeflow train``) → :class:`~latticeflow.training.TrainingResult`;
* :func:`load_flow` (a run directory or checkpoint) → :class:`TrainedFlow`, whose
  :meth:`TrainedFlow.sample` draws configurations with log q and the action;
* :func:`nmcmc` (``latticeflow sample``) and :func:`hmc` (``latticeflow hmc``) →
  :class:`~latticeflow.ensemble.Ensemble` in memory, also written to HDF5 when ``out`` is given;
* :func:`read_ensemble`, :func:`analyse` (``analysis/observables.py``) →
  :class:`~latticeflow.measure.AnalysisResult`.

Conventions (DESIGN §3): lattices are ``(L0, L1, ...)`` tuples (or ``"8x8"`` strings); φ⁴
fields are ``(batch, L0, L1)``, U(1) links ``(batch, 2, L0, L1)`` angles in [0, 2π); an
ensemble's rows are in Monte Carlo order per chain (``/chain``, row i of an n-chain run belongs
to chain ``i % n``). Bad input raises :class:`~latticeflow.base.errors.LatticeflowError` (or its
subclass :class:`~latticeflow.base.errors.ConfigError` for cards and recipes), never a bare
traceback from deep inside. Defaults are those of the command, so the same settings and seed
give the same ensemble, row for row and bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe
from latticeflow.config import load_recipe as _load_recipe_file
from latticeflow.ensemble import Ensemble, read_ensemble
from latticeflow.ensemble.output import check_seed
from latticeflow.flows.samples import FlowSamples
from latticeflow.lattice import lattice_shape
from latticeflow.measure import AnalysisResult, ObservableResult, analyse
from latticeflow.theories import Action, load_action_card
from latticeflow.training import (
    LoadedFlow,
    TrainingResult,
    load_checkpoint,
)
from latticeflow.workflows.chainfile import ChainRun, check_count
from latticeflow.workflows.hmc import HMCRunSettings, hmc_run
from latticeflow.workflows.sample import SampleSettings, sample_run
from latticeflow.workflows.train import TrainSettings, train_run

PathLike = str | os.PathLike

__all__ = ["AnalysisResult", "Ensemble", "FlowSamples", "ObservableResult", "TrainedFlow",
           "analyse", "hmc", "load_action", "load_flow", "load_recipe", "nmcmc",
           "read_ensemble", "train"]


# ------------------------------------------------------------------------------ inputs
def load_action(card: PathLike | Action) -> Action:
    """The action of an action card (``actions/*.toml``); an :class:`Action` is returned as is.

    ``action(x)`` is S per configuration ``(batch,)``, ``action.force(x)`` is −∂S/∂x.
    """
    return card if isinstance(card, Action) else load_action_card(card)


def load_recipe(path: PathLike, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """A validated run recipe (``runs/*.toml``; schema in :mod:`latticeflow.config`).

    ``overrides`` maps dotted keys to values (``{"training.steps": 100, "device": "cpu"}``);
    they are validated like the file's own values.
    """
    return _load_recipe_file(path, dict(overrides or {}))


# ------------------------------------------------------------------------------ training
def train(recipe: PathLike | Recipe, out: PathLike | None = None, *, steps: int | None = None,
          device: str | None = None, resume: bool = False, force: bool = False,
          init_from: PathLike | None = None) -> TrainingResult:
    """Train a recipe's flow, like ``latticeflow train``; returns where the files went.

    ``out``: the run directory (default ``<recipe dir>/<recipe name>``); it gets
    ``checkpoint.pt``, ``metrics.csv`` and ``training.png``. ``steps`` and ``device`` override
    ``training.steps`` and ``device``. An existing checkpoint is continued with ``resume`` or
    replaced with ``force``, never silently. ``init_from`` (run directory or checkpoint) starts
    from other weights; without it a recipe's ``init_from`` chain is trained first.
    """
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["training.steps"] = steps
    if device is not None:
        overrides["device"] = device
    if isinstance(recipe, Recipe):
        if overrides:
            raise LatticeflowError("train: steps= and device= apply to a recipe file; for a "
                                   "Recipe object use load_recipe(path, overrides)")
    else:
        recipe = load_recipe(recipe, overrides)
    return train_run(recipe, TrainSettings(
        out=None if out is None else Path(out), resume=resume, force=force,
        init_from=None if init_from is None else Path(init_from),
        lineage_overrides={"device": device} if device else {}))


# ------------------------------------------------------------------------------ flows
@dataclasses.dataclass
class TrainedFlow(LoadedFlow):
    """A trained flow (the fields of :class:`~latticeflow.training.LoadedFlow`: ``flow``,
    ``action``, ``lattice``, ``recipe``, ``step``, ``sha256``, ``last_ess``) that samples."""

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> FlowSamples:
        """``n`` independent configurations x ~ q with log q(x) and S(x) (see
        :class:`FlowSamples`). ``seed`` seeds a private generator (None: torch's global one)."""
        if not isinstance(n, int) or n < 1:
            raise LatticeflowError(f"sample: n must be a positive integer, got {n!r}")
        generator = None
        if seed is not None:
            device = self.flow.device
            generator = torch.Generator(device=device).manual_seed(int(seed))
        x, log_q = self.flow.sample(n, generator=generator)
        return FlowSamples(x, log_q.double(), self.action(x).double())


def load_flow(run_dir_or_checkpoint: PathLike | LoadedFlow, *, device: str | None = None,
              lattice: Sequence[int] | str | None = None) -> TrainedFlow:
    """The trained flow of a run directory or checkpoint file, ready to sample.

    ``device``: None → CUDA when available, else CPU. ``lattice``: rebuild the flow on another
    lattice (the weights do not depend on its size), like ``latticeflow sample --lattice``.
    """
    if isinstance(run_dir_or_checkpoint, LoadedFlow):
        if device is not None or lattice is not None:
            raise LatticeflowError("load_flow: device and lattice apply to a checkpoint, not "
                                   "to a flow already loaded")
        if isinstance(run_dir_or_checkpoint, TrainedFlow):
            return run_dir_or_checkpoint
        loaded = run_dir_or_checkpoint
    else:
        loaded = load_checkpoint(run_dir_or_checkpoint, device=device,
                                 lattice=None if lattice is None else lattice_shape(lattice))
    return TrainedFlow(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)})


# ------------------------------------------------------------------------------ ensembles
#: The header fields a resumed file must match, as the API checks them.
_RESUME_CHECKS = ("theory", "action_params", "lattice", "sampler", "seed", "sampler_params",
                  "checkpoint_sha256")


def _ensemble(run: Callable[[Path], ChainRun], out: PathLike | None, resume: bool,
              force: bool) -> Ensemble:
    """Run a workflow into ``out`` and return the ensemble in memory; interrupted runs raise
    :class:`KeyboardInterrupt`.

    Without ``out`` the rows go through a temporary file (the same writer and chunking as a
    real file, so memory and disk ensembles are identical); the returned metadata then has
    ``path = "<in memory>"``.
    """
    if out is not None:
        if resume and force:
            raise LatticeflowError("resume and force exclude each other")
        if run(Path(out)).interrupted:
            raise KeyboardInterrupt
        return read_ensemble(Path(out))
    if resume or force:
        raise LatticeflowError("resume and force need an output file (out=...)")
    with tempfile.TemporaryDirectory(prefix="latticeflow-") as folder:
        path = Path(folder) / "ensemble.h5"
        if run(path).interrupted:
            raise KeyboardInterrupt
        ensemble = read_ensemble(path)
    return Ensemble(dataclasses.replace(ensemble.metadata, path="<in memory>"), ensemble.data)


def nmcmc(flow: PathLike | LoadedFlow, n: int | None = None, *, batch_size: int | None = None,
          chains: int | None = None, seed: int | None = None, chunk: int | None = None,
          store_dtype: str = "float32", out: PathLike | None = None, resume: bool = False,
          force: bool = False) -> Ensemble:
    """Neural MCMC (independent Metropolis–Hastings with flow proposals), like
    ``latticeflow sample``: an ensemble of ``n`` rows with ``configs`` ``(n, *field_shape)``
    (``store_dtype``), ``action``, ``accepted``, ``log_q``, ``log_weight`` (and ``chain`` with
    ``chains > 1``, rows round-robin).

    ``flow``: a :func:`load_flow` result or a run directory / checkpoint. ``n``, ``batch_size``
    (proposals per device batch), ``chains``, ``seed`` and ``chunk`` (rows per committed chunk)
    default to the recipe's ``[sampling]`` section. ``out``: also write the HDF5 file
    (``resume`` continues it, ``force`` replaces it).
    """
    loaded = flow if isinstance(flow, LoadedFlow) else load_flow(flow)
    settings = SampleSettings(out=Path(), n=n, chunk=chunk, batch_size=batch_size,
                              chains=chains, seed=seed, store_dtype=store_dtype, resume=resume,
                              force=force, report=False, resume_checks=_RESUME_CHECKS
                              ).resolved(loaded)
    for name in ("batch_size", "chains"):
        check_count({}, name, getattr(settings, name))
    check_seed(settings.seed)
    if settings.chunk % settings.chains or settings.n % settings.chains:
        raise LatticeflowError(f"n ({settings.n}) and chunk ({settings.chunk}) must be "
                               f"multiples of chains ({settings.chains})")
    return _ensemble(lambda path: sample_run(loaded, dataclasses.replace(settings, out=path)),
                     out, resume, force)


def hmc(action: PathLike | Action, lattice: Sequence[int] | str, n: int, *,
        step_size: float = 0.1, trajectory_length: float = 1.0, integrator: str = "omelyan",
        target_accept: float | None = 0.8, therm: int = 200, save_every: int = 1,
        chains: int = 1, seed: int = 0, device: str = "cpu", dtype: str = "float64",
        chunk: int = 100, out: PathLike | None = None, resume: bool = False,
        force: bool = False) -> Ensemble:
    """Hybrid Monte Carlo with the analytic force, like ``latticeflow hmc`` (same defaults): an
    ensemble of ``n`` rows with ``configs`` ``(n, *field_shape)`` (``dtype``), ``action``,
    ``accepted``, ``delta_H`` and ``chain`` (rows round-robin over ``chains``).

    ``action``: an :class:`Action` or an action card. ``lattice``: ``(8, 8)`` or ``"8x8"``.
    ``step_size`` ε (the start value when tuned), ``trajectory_length`` τ = n_steps·ε,
    ``target_accept``: tune ε to this acceptance during the ``therm`` thermalisation
    trajectories (None or 0: no tuning), ``save_every``: store every k-th trajectory.
    ``out``: also write the HDF5 file (``resume`` continues it, ``force`` replaces it).
    """
    act = load_action(action)
    shape = lattice_shape(lattice)
    settings = HMCRunSettings(out=Path(), n=n, chunk=chunk, step_size=step_size,
                              trajectory_length=trajectory_length, integrator=integrator,
                              target_accept=target_accept, therm=therm, save_every=save_every,
                              chains=chains, seed=seed, device=device, dtype=dtype,
                              resume=resume, force=force, report=False,
                              resume_checks=_RESUME_CHECKS)
    return _ensemble(lambda path: hmc_run(act, shape, dataclasses.replace(settings, out=path)),
                     out, resume, force)
