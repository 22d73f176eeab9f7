"""Normalizing flows: priors, the masked coupling with its score recursion, RealNVP, U(1)
plaquette couplings (NCP or circular splines), and a flow averaged over lattice symmetries."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.realnvp import realnvp
from latticeflow.flows.symmetrize import LatticeSymmetry, SymmetrizedFlow, diagonal_shifts
from latticeflow.flows.u1_equivariant import MASK_PERIOD, u1_equivariant

__all__ = ["ElementwiseUpdate", "Flow", "LatticeSymmetry", "MaskedCoupling", "SymmetrizedFlow",
           "build_flow", "diagonal_shifts", "realnvp", "u1_equivariant", "DEFAULT_ARCHITECTURE",
           "MASK_PERIOD"]

_FLOWS = {"phi4": realnvp, "u1": u1_equivariant}
#: Constructor arguments taken from the action card rather than the architecture.
_TARGET_ARGUMENTS = ("beta", "action_params")


def _signature_defaults(constructor: Callable[..., Flow]) -> dict[str, Any]:
    """The architecture keywords of a flow constructor with their defaults (the lattice and the
    action parameters excluded; sequences as lists, the form recipes and checkpoints store)."""
    return {name: list(p.default) if isinstance(p.default, tuple) else p.default
            for name, p in inspect.signature(constructor).parameters.items()
            if p.default is not inspect.Parameter.empty and name not in _TARGET_ARGUMENTS}


#: Defaults per theory, read from the constructors' signatures (the one place they are set);
#: a recipe's [flow] table overrides any of these keys.
DEFAULT_ARCHITECTURE: dict[str, dict[str, Any]] = {
    theory: _signature_defaults(constructor) for theory, constructor in _FLOWS.items()}


def build_flow(theory: str, lattice: tuple[int, ...], architecture: dict[str, Any] | None = None,
               action_params: Mapping[str, Any] | None = None) -> Flow:
    """The flow for ``theory`` ("phi4" → RealNVP, "u1" → gauge-equivariant
    plaquette couplings) on ``lattice``.

    ``action_params`` (the action card's parameters) feed base densities built from the target:
    the U(1) ``"plaquette"`` prior takes its concentration from ``beta``, a φ⁴ flow with
    ``heat_bath`` its even sites' conditional. Weights never depend on
    them, so a state dict moves between flows built for different parameters.
    """
    arch = {**DEFAULT_ARCHITECTURE[theory], **(architecture or {})}
    if theory == "phi4":
        return realnvp(tuple(lattice), **arch, action_params=action_params)
    beta = None if action_params is None else action_params.get("beta")
    return u1_equivariant(tuple(lattice), **arch, beta=beta)
