"""Normalizing flows: priors, the masked coupling with its score recursion, RealNVP, U(1) NCP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.realnvp import realnvp
from latticeflow.flows.u1_equivariant import MASK_PERIOD, u1_equivariant

__all__ = ["ElementwiseUpdate", "Flow", "MaskedCoupling", "build_flow", "realnvp",
           "u1_equivariant", "DEFAULT_ARCHITECTURE", "MASK_PERIOD"]

#: Defaults per theory; a recipe's [flow] table overrides any of these keys.
DEFAULT_ARCHITECTURE: dict[str, dict[str, Any]] = {
    "phi4": {"n_couplings": 8, "hidden": [16, 16], "kernel_size": 3, "activation": "leaky_relu",
             "base": "normal", "fourier_terms": 3, "transform": "affine", "n_bins": 8,
             "spline_bound": 3.0},
    "u1": {"n_couplings": 16, "n_mixture": 6, "hidden": [8, 8], "kernel_size": 3,
           "activation": "leaky_relu", "loop_length": 2, "prior": "plaquette"},
}


def build_flow(theory: str, lattice: tuple[int, ...], architecture: dict[str, Any] | None = None,
               action_params: Mapping[str, Any] | None = None) -> Flow:
    """The flow for ``theory`` ("phi4" → RealNVP, "u1" → gauge-equivariant NCP) on ``lattice``.

    ``action_params`` (the action card's parameters) feed base densities built from the target:
    the U(1) ``"plaquette"`` prior takes its concentration from ``beta``. Weights never depend on
    them, so a state dict moves between flows built for different parameters.
    """
    arch = {**DEFAULT_ARCHITECTURE[theory], **(architecture or {})}
    if theory == "phi4":
        return realnvp(tuple(lattice), **arch)
    beta = None if action_params is None else action_params.get("beta")
    return u1_equivariant(tuple(lattice), **arch, beta=beta)
