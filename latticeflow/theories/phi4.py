"""Scalar φ⁴ theory in two parametrisations.

Standard form (field φ, parameters m², λ; the usual normalising-flow benchmark convention)::

    S = Σ_x [ Σ_μ (φ(x+μ̂) − φ(x))² + m² φ(x)² + λ φ(x)⁴ ]

Hopping form (field ϕ, parameters κ, λ̂)::

    S = Σ_x [ −2κ Σ_μ ϕ(x) ϕ(x+μ̂) + (1 − 2λ̂) ϕ(x)² + λ̂ ϕ(x)⁴ ]

Exact mapping in d dimensions: φ = √κ ϕ, λ = λ̂/κ², m² = (1 − 2λ̂)/κ − 2d. With these, both
actions take the same value on corresponding configurations (no additive constant).
"""

from __future__ import annotations

import math

from torch import Tensor

from latticeflow.lattice import shift
from latticeflow.theories.base import Action


def _sites(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _neighbour_sum(x: Tensor) -> Tensor:
    """Σ_μ [φ(x+μ̂) + φ(x−μ̂)]."""
    d = x.dim() - 1
    return sum(shift(x, mu, 1) + shift(x, mu, -1) for mu in range(d))


def _forward_links(x: Tensor) -> Tensor:
    """Σ_μ φ(x) φ(x+μ̂) per site."""
    d = x.dim() - 1
    return sum(x * shift(x, mu, 1) for mu in range(d))


class Phi4(Action):
    """φ⁴ in the standard form, S = Σ[Σ_μ(∂_μφ)² + m²φ² + λφ⁴]; field ``(batch, L0, L1, ...)``."""

    theory = "phi4"

    def __init__(self, m2: float, lam: float):
        self.m2 = float(m2)
        self.lam = float(lam)

    def __call__(self, x: Tensor) -> Tensor:
        d = x.dim() - 1
        x2 = x * x
        density = (2 * d + self.m2) * x2 + self.lam * x2 * x2 - 2 * _forward_links(x)
        return density.sum(_sites(x))

    def force(self, x: Tensor) -> Tensor:
        d = x.dim() - 1
        return 2 * _neighbour_sum(x) - 2 * (2 * d + self.m2) * x - 4 * self.lam * x**3

    def field_shape(self, lattice: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(lattice)

    def params(self) -> dict[str, float | str]:
        return {"form": "standard", "m2": self.m2, "lam": self.lam}


class Phi4Hopping(Action):
    """φ⁴ in the hopping form, S = Σ[−2κ Σ_μ ϕϕ(x+μ̂) + (1−2λ)ϕ² + λϕ⁴]."""

    theory = "phi4"

    def __init__(self, kappa: float, lam: float):
        self.kappa = float(kappa)
        self.lam = float(lam)

    def __call__(self, x: Tensor) -> Tensor:
        x2 = x * x
        density = (
            -2 * self.kappa * _forward_links(x) + (1 - 2 * self.lam) * x2 + self.lam * x2 * x2
        )
        return density.sum(_sites(x))

    def force(self, x: Tensor) -> Tensor:
        return 2 * self.kappa * _neighbour_sum(x) - 2 * (1 - 2 * self.lam) * x - 4 * self.lam * x**3

    def field_shape(self, lattice: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(lattice)

    def params(self) -> dict[str, float | str]:
        return {"form": "hopping", "kappa": self.kappa, "lam": self.lam}


def hopping_to_standard(kappa: float, lam: float, d: int = 2) -> tuple[float, float, float]:
    """(κ, λ̂) → (m², λ, field scale √κ) such that S_std(√κ ϕ) = S_hop(ϕ)."""
    if kappa <= 0:
        raise ValueError("the hopping form needs kappa > 0")
    return (1 - 2 * lam) / kappa - 2 * d, lam / kappa**2, math.sqrt(kappa)


def standard_to_hopping(m2: float, lam: float, d: int = 2) -> tuple[float, float, float]:
    """(m², λ) → (κ, λ̂, field scale 1/√κ) such that S_hop(φ/√κ) = S_std(φ).

    Solves (2d + m²) κ = 1 − 2λκ² for the positive root κ.
    """
    a = 2 * lam
    b = 2 * d + m2
    kappa = 1 / b if a == 0 else (-b + math.sqrt(b * b + 4 * a)) / (2 * a)
    return kappa, lam * kappa**2, 1 / math.sqrt(kappa)
