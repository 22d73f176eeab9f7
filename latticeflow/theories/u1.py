"""Two-dimensional U(1) lattice gauge theory with the Wilson plaquette action.

Links are angles θ_μ(x), tensor ``(batch, 2, L0, L1)``. With the plaquette
P(x) = θ₀(x) + θ₁(x+0̂) − θ₀(x+1̂) − θ₁(x) the action is S = −β Σ_x cos P(x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from latticeflow.lattice import plaquette, plaquette_adjoint
from latticeflow.theories.base import Action


class U1Wilson(Action):
    """S = −β Σ_x cos P(x) on a periodic 2D lattice."""

    theory = "u1"

    def __init__(self, beta: float):
        self.beta = float(beta)

    def __call__(self, x: Tensor) -> Tensor:
        return -self.beta * torch.cos(plaquette(x)).sum((1, 2))

    def force(self, x: Tensor) -> Tensor:
        return plaquette_adjoint(-self.beta * torch.sin(plaquette(x)))

    def field_shape(self, lattice: tuple[int, ...]) -> tuple[int, ...]:
        if len(lattice) != 2:
            raise ValueError(f"U(1) gauge theory is implemented in 2D only, got lattice {lattice}")
        return (2, *lattice)

    def params(self) -> dict[str, float | str]:
        return {"beta": self.beta}
