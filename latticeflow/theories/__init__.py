"""Lattice actions and the action cards (``actions/*.toml``) that define them.

Action card keys
----------------
``theory = "phi4"`` with ``form = "standard"`` (keys ``m2``, ``lam``) or ``form = "hopping"``
(keys ``kappa`` > 0, ``lam`` >= 0); ``theory = "u1"`` with ``beta`` >= 0. An optional
``description`` string is kept for humans. Anything else is rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latticeflow.base.errors import ConfigError
from latticeflow.base.toml_fields import Table, read_toml
from latticeflow.theories.base import Action
from latticeflow.theories.phi4 import Phi4, Phi4Hopping, hopping_to_standard, standard_to_hopping
from latticeflow.theories.u1 import U1Wilson

__all__ = ["Action", "Phi4", "Phi4Hopping", "U1Wilson", "hopping_to_standard",
           "standard_to_hopping", "action_from_table", "load_action_card"]


def action_from_table(data: dict[str, Any], source: str = "<action>") -> Action:
    """Build an action from a card's table (as parsed TOML or as stored in a checkpoint)."""
    table = Table(data, source)
    theory = table.choice("theory", ("phi4", "u1"))
    table.get("description", str, None)
    if theory == "u1":
        action: Action = U1Wilson(table.number("beta", low=0.0))
    elif table.choice("form", ("standard", "hopping"), "standard") == "standard":
        action = Phi4(table.number("m2"), table.number("lam", low=0.0))
    else:
        action = Phi4Hopping(table.number("kappa", low=0.0, low_open=True),
                             table.number("lam", low=0.0))
    table.finish()
    return action


def load_action_card(path: str | Path) -> Action:
    """Read and validate ``actions/NAME.toml``."""
    data = read_toml(path)
    if not data:
        raise ConfigError(str(path), None, "empty action card")
    return action_from_table(data, str(path))
