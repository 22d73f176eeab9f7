"""``latticeflow run``: train → sample → analyse from one recipe, resuming what is done."""

from __future__ import annotations

import argparse
import json
import logging
import os
import textwrap
from pathlib import Path

from latticeflow.base.errors import LatticeflowError
from latticeflow.base.locking import run_dir_held
from latticeflow.config import Recipe, load_recipe
from latticeflow.ensemble import EnsembleReader
from latticeflow.training import (
    CHECKPOINT_NAME,
    load_checkpoint,
    read_checkpoint,
    recipe_lineage,
    train_ancestors,
)
from latticeflow.training.checkpoint import refuse_other_recipe
from latticeflow.workflows import ANALYSIS_DIR, ENSEMBLE_NAME
from latticeflow.workflows.analyse import AnalyseSettings, analyse_run
from latticeflow.workflows.chainfile import OPTION_NAMES
from latticeflow.workflows.sample import SampleSettings, sample_run
from latticeflow.workflows.train import TrainSettings, train_run

log = logging.getLogger("latticeflow")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run", help="train, sample and analyse a recipe in one go",
        description="Train the recipe's flow, generate its neural-MCMC ensemble ([sampling]) "
                    "and analyse it ([analysis]). Each stage is skipped when its output is "
                    "complete and resumed when it is partial, so re-running continues where a "
                    "previous run stopped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow run runs/quickstart.toml
              latticeflow run runs/u1_beta2_L8.toml --device cuda
              latticeflow run runs/u1_flow_beta6_L8.toml  # trains β = 2…5 first (init_from)"""),
    )
    parser.add_argument("recipe", type=Path, help="run recipe (TOML)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the recipe)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="run directory (default: <recipe directory>/<recipe name>)")
    parser.add_argument("--force", action="store_true",
                        help="start every stage over, replacing the run directory's outputs")
    parser.set_defaults(handler=run)


def check_run_dir(run_dir: Path) -> None:
    """The run directory exists as a writable directory or can be created."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise LatticeflowError(f"run directory {run_dir} is a file; use --out for another "
                                   f"directory")
        folder = run_dir
    else:
        folder = run_dir.absolute().parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise LatticeflowError(f"cannot create run directory {run_dir}: {folder} is not a "
                                   f"directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LatticeflowError(f"cannot write to run directory {run_dir}: {folder} is not "
                               f"writable")


def preflight(recipe: Recipe, run_dir: Path, force: bool) -> None:
    """Refuse, before any work, what a later stage would refuse: an unusable run directory, a
    checkpoint trained from another recipe, an ensemble that cannot be read or continued."""
    check_run_dir(run_dir)
    if force:
        return
    checkpoint = run_dir / CHECKPOINT_NAME
    complete_digest = None
    if checkpoint.exists():
        state, digest = read_checkpoint(checkpoint)
        refuse_other_recipe(state, recipe, f"{checkpoint} was trained from another recipe "
                                           f"(differs in {{differences}}); use --force to start "
                                           f"over, or --out for another run directory")
        if state["step"] >= recipe.training.steps:
            complete_digest = digest
    ensemble = run_dir / ENSEMBLE_NAME
    if ensemble.exists():
        with EnsembleReader(ensemble) as reader:
            meta = reader.metadata
        if complete_digest is None or meta.checkpoint_sha256 != complete_digest:
            raise LatticeflowError(f"{ensemble} was sampled from another checkpoint than the "
                                   f"one this run trains ({checkpoint}); use --force to start "
                                   f"over")


def train_stage(recipe: Recipe, run_dir: Path, force: bool, overrides: dict[str, str]) -> str:
    """Train, resume or skip (first the ``init_from`` lineage, see
    :mod:`latticeflow.training.lineage`); returns the sha256 of the final checkpoint. ``force``
    restarts this recipe's training only."""
    checkpoint = run_dir / CHECKPOINT_NAME
    resume = False
    if checkpoint.exists() and not force:
        state, digest = read_checkpoint(checkpoint)
        if state["step"] >= recipe.training.steps:
            log.info("[1/3] training: complete (%s, step %d)", checkpoint, state["step"])
            return digest
        resume = True
    parent = None if resume else train_ancestors(recipe, overrides)  # logged before this one
    log.info("[1/3] training %s%s", recipe.name, " (resuming)" if resume else "")
    result = train_run(recipe, TrainSettings(out=run_dir, resume=resume, force=force,
                                             init_from=parent))
    log.info("      final ESS %s, %.0f s", "n/a" if result.ess is None else f"{result.ess:.3f}",
             result.wall_time)
    return read_checkpoint(checkpoint)[1]


def sample_stage(recipe: Recipe, run_dir: Path, digest: str, force: bool, device: str | None
                 ) -> Path:
    out = run_dir / ENSEMBLE_NAME
    resume = False
    if out.exists() and not force:
        with EnsembleReader(out) as reader:
            meta = reader.metadata
        if meta.checkpoint_sha256 != digest:
            raise LatticeflowError(f"{out} was sampled from another checkpoint than "
                                   f"{run_dir / CHECKPOINT_NAME}; use --force to resample")
        if meta.n_complete >= recipe.sampling.n:
            log.info("[2/3] sampling: complete (%s, %d rows)", out, meta.n_complete)
            return out
        resume = True
    log.info("[2/3] sampling %d configurations%s", recipe.sampling.n,
             " (resuming)" if resume else "")
    loaded = load_checkpoint(run_dir, device=device or "auto")
    settings = SampleSettings(out=out, resume=resume, force=force, names=OPTION_NAMES,
                              source=str(run_dir))
    if sample_run(loaded, settings).interrupted:
        raise KeyboardInterrupt
    return out


def analysis_stage(recipe: Recipe, run_dir: Path, ensemble: Path) -> Path:
    folder = run_dir / ANALYSIS_DIR
    record_path = folder / "observables.json"
    with EnsembleReader(ensemble) as reader:
        n_rows = reader.n_complete
    key = {"n_rows": n_rows, "thermalization": recipe.analysis.thermalization}
    if record_path.exists():
        try:
            if json.loads(record_path.read_text()).get("source") == key:
                log.info("[3/3] analysis: complete (%s)", record_path)
                return record_path
        except (OSError, ValueError):
            pass
    log.info("[3/3] analysing %s", ensemble)
    folder.mkdir(parents=True, exist_ok=True)
    analysis = analyse_run(ensemble, AnalyseSettings(
        thermalization=recipe.analysis.thermalization, report=folder / "observables.txt",
        plots=folder if recipe.analysis.plots else None, autocorrelation=True,
        record=record_path, record_extra={"source": key}, show=print))
    for path in analysis.plots:
        log.info("      wrote %s", path)
    return record_path


def run(args: argparse.Namespace) -> int:
    from latticeflow.base.distributed import torchrun_ranks

    if torchrun_ranks() is not None:
        raise LatticeflowError("'latticeflow run' is a single-process pipeline; under torchrun "
                               "use 'latticeflow train' and 'latticeflow sample' instead")
    overrides = {} if args.device is None else {"device": args.device}
    recipe = load_recipe(args.recipe, overrides)
    run_dir = args.out or recipe.default_run_dir()
    recipe_lineage(recipe, overrides)  # refuse a looping or inconsistent lineage before any work
    preflight(recipe, run_dir, args.force)
    with run_dir_held(run_dir):  # no other process trains here while this pipeline runs
        digest = train_stage(recipe, run_dir, args.force, overrides)
        ensemble = sample_stage(recipe, run_dir, digest, args.force, args.device)
        record = analysis_stage(recipe, run_dir, ensemble)
    log.info("done. run directory %s:\n  checkpoint  %s\n  ensemble    %s\n  analysis    %s",
             run_dir, run_dir / CHECKPOINT_NAME, ensemble, record.parent)
    return 0
