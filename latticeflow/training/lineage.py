"""Recipe lineage: a recipe that starts from another recipe's trained flow (``init_from``).

A lineage such as ``u1_flow_beta6_L8 → u1_flow_beta5_L8 → … → u1_flow_beta2_L8`` is resolved
root first. Every link must train the same theory with the same ``[flow]`` (the weights move from
recipe to recipe; the lattice and the action parameters may change), and no recipe may appear
twice. Each parent trains in its own default run directory (``<recipe dir>/<name>``): a complete
link is skipped, a partial one resumed, a missing one trained from its own parent's weights
(or from its own fresh start when that is better, ``training.init_floor``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe, load_recipe
from latticeflow.training.checkpoint import (
    CHECKPOINT_NAME,
    can_start_from,
    read_checkpoint,
    refuse_other_recipe,
)
from latticeflow.training.rundir import open_trainer

log = logging.getLogger("latticeflow")


def recipe_lineage(recipe: Recipe, overrides: dict[str, Any] | None = None) -> list[Recipe]:
    """The ancestors of ``recipe`` named by ``init_from``, root first (``recipe`` excluded).

    ``overrides`` (e.g. the device) apply to every ancestor. Raises a one-line
    :class:`LatticeflowError` for a loop, a change of theory or a change of architecture.
    """
    ancestors: list[Recipe] = []
    seen = [Path(recipe.source).resolve()]
    child = recipe
    while (parent_path := child.parent_recipe_path()) is not None:
        if parent_path in seen:
            loop = " → ".join(p.name for p in [*seen, parent_path])
            raise LatticeflowError(f"{recipe.source}: the init_from chain loops ({loop})")
        parent = load_recipe(parent_path, overrides)
        if parent.theory != child.theory:
            raise LatticeflowError(f"{child.source}: init_from {parent_path.name} changes the "
                                   f"theory ({parent.theory} → {child.theory})")
        if not can_start_from(parent.architecture, child.architecture):
            raise LatticeflowError(f"{child.source}: init_from {parent_path.name} has another "
                                   f"[flow] architecture; a chain keeps the architecture (a "
                                   f"link may only add coarse levels)")
        seen.append(parent_path)
        ancestors.insert(0, parent)
        child = parent
    return ancestors


def _complete(run_dir: Path, recipe: Recipe) -> bool:
    """Whether ``run_dir`` holds a finished run of ``recipe`` (another recipe's run is refused)."""
    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.exists():
        return False
    state, _ = read_checkpoint(checkpoint)
    refuse_other_recipe(state, recipe, f"{checkpoint} was trained from another recipe than "
                                       f"{recipe.source} (differs in {{differences}})")
    return state["step"] >= recipe.training.steps


def train_ancestors(recipe: Recipe, overrides: dict[str, Any] | None = None) -> Path | None:
    """Train, resume or skip every ancestor of ``recipe``; the run directory of its parent.

    ``None`` when the recipe names no ``init_from``.
    """
    parent_dir: Path | None = None
    for link in recipe_lineage(recipe, overrides):
        run_dir = link.default_run_dir()
        if _complete(run_dir, link):
            log.info("chain: %s is trained (%s)", link.name, run_dir)
        else:
            resume = (run_dir / CHECKPOINT_NAME).exists()
            log.info("chain: %s %s", "resuming" if resume else "training", link.name)
            trainer = open_trainer(link, run_dir, resume=resume,
                                   init_from=None if resume else parent_dir)
            trainer.train()
        parent_dir = run_dir
    return parent_dir


def lineage_training_seconds(recipe: Recipe, state: dict[str, Any]) -> tuple[float, float | None]:
    """Training wall seconds of ``state``, a checkpoint of ``recipe``: its own ``wall_time``, and
    the sum over the ``init_from`` ancestors whose weights it actually started from, nearest
    first, stopping at a link that started fresh (the floor, ``training.init_floor``). None for
    the sum when an ancestor's checkpoint is missing."""
    own = total = float(state["wall_time"])
    for link in reversed(recipe_lineage(recipe)):
        if state.get("started_fresh", False):
            break
        checkpoint = link.default_run_dir() / CHECKPOINT_NAME
        if not checkpoint.is_file():
            return own, None
        state, _ = read_checkpoint(checkpoint)
        total += float(state["wall_time"])
    return own, total


__all__ = ["lineage_training_seconds", "recipe_lineage", "train_ancestors"]
