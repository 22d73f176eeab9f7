"""The training data of forward estimators: an HDF5 ensemble's configurations, checked
against the recipe (theory, lattice, action, field shape) and moved to the device."""

from __future__ import annotations

import logging

import torch

from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe
from latticeflow.ensemble import read_ensemble
from latticeflow.theories import Action, action_from_table

log = logging.getLogger("latticeflow")


def load_training_data(recipe: Recipe, action: Action, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """The ensemble's configurations on the device, after checking they fit the recipe."""
    path = recipe.training.data
    ensemble = read_ensemble(path)
    meta = ensemble.metadata
    problems = []
    if meta.theory != recipe.theory:
        problems.append(f"theory {meta.theory!r} (recipe: {recipe.theory!r})")
    if meta.lattice != recipe.lattice:
        problems.append(f"lattice {list(meta.lattice)} (recipe: {list(recipe.lattice)})")
    else:
        try:
            card = action_from_table(dict(meta.action_params), f"{path}: action_params").card()
        except LatticeflowError as exc:
            raise LatticeflowError(f"{path}: unusable action parameters: {exc}") from None
        if card != dict(recipe.action_card):
            problems.append(f"action {card} (recipe: {dict(recipe.action_card)})")
    if problems:
        raise LatticeflowError(f"training data {path} does not match the recipe: "
                               + "; ".join(problems))
    if len(ensemble) == 0:
        raise LatticeflowError(f"training data {path} holds no configurations")
    configs = torch.as_tensor(ensemble["configs"])
    expected = action.field_shape(recipe.lattice)
    if tuple(configs.shape[1:]) != tuple(expected):
        raise LatticeflowError(f"training data {path}: configurations have shape "
                               f"{tuple(configs.shape[1:])}, expected {tuple(expected)}")
    log.info("training data: %d configurations from %s", len(configs), path)
    return configs.to(device=device, dtype=dtype)


__all__ = ["load_training_data"]
