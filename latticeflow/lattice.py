"""Lattice geometry: periodic shifts, masks and plaquettes.

Conventions
-----------
* A lattice has shape ``(L0, L1, ...)`` with periodic boundaries; fields carry a leading batch
  dimension, so a scalar field is ``(batch, L0, L1, ...)`` and a U(1) gauge field (link angles
  θ_μ(x)) is ``(batch, d, L0, L1, ...)``.
* ``shift(f, mu, n)`` returns the field ``g(x) = f(x + n·μ̂)``; the lattice axes are the *last*
  ``d`` axes of the tensor, so the same helper serves scalar fields and single link components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from latticeflow.base.errors import LatticeflowError


def lattice_shape(lattice: Sequence[int] | str, name: str = "lattice",
                  form: str = "(8, 8) or '8x8'") -> tuple[int, ...]:
    """``(8, 8)``, ``[8, 8]`` or ``"8x8"`` → ``(8, 8)``. Anything else raises a
    :class:`LatticeflowError` that names the input ``name`` and the expected ``form``."""
    try:
        shape = tuple(int(n) for n in (lattice.lower().split("x") if isinstance(lattice, str)
                                       else lattice))
    except (TypeError, ValueError):
        raise LatticeflowError(f"{name} must look like {form}, got {lattice!r}") from None
    if not shape or min(shape) < 1:
        raise LatticeflowError(f"{name} extents must be positive, got {lattice!r}")
    return shape


def shift(field: Tensor, mu: int, n: int = 1, ndim: int | None = None) -> Tensor:
    """``g(x) = f(x + n μ̂)`` with periodic boundaries.

    ``ndim`` is the number of lattice axes (the trailing axes of ``field``); by default all axes
    but the first (batch) one.
    """
    d = field.dim() - 1 if ndim is None else ndim
    axis = field.dim() - d + mu
    return torch.roll(field, shifts=-n, dims=axis)


def checkerboard(lattice: tuple[int, ...], parity: int, device=None) -> Tensor:
    """Boolean mask of the sites with ``Σ x_μ ≡ parity (mod 2)``, shape ``lattice``."""
    coords = torch.meshgrid(*[torch.arange(n, device=device) for n in lattice], indexing="ij")
    return (sum(coords) % 2) == parity


def stripes(lattice: tuple[int, ...], axis: int, offset: int, period: int, device=None) -> Tensor:
    """Boolean mask of the sites with ``x_axis ≡ offset (mod period)``, shape ``lattice``."""
    coord = torch.arange(lattice[axis], device=device)
    line = (coord % period) == (offset % period)
    view = [1] * len(lattice)
    view[axis] = lattice[axis]
    return line.view(view).expand(lattice).clone()


def plaquette(links: Tensor) -> Tensor:
    """Plaquette angle P(x) = θ₀(x) + θ₁(x+0̂) − θ₀(x+1̂) − θ₁(x) (not wrapped).

    ``links``: ``(batch, 2, L0, L1)`` → ``(batch, L0, L1)``.
    """
    t0, t1 = links[:, 0], links[:, 1]
    return t0 + shift(t1, 0) - shift(t0, 1) - t1


def plaquette_adjoint(g: Tensor) -> Tensor:
    """The link gradient of a function of the plaquettes: ``g = ∂f/∂P(x)`` → ``∂f/∂θ_μ(x)``.

    θ₀(x) enters P(x) with +1 and P(x−1̂) with −1; θ₁(x) enters P(x−0̂) with +1 and P(x) with −1.
    ``g``: ``(batch, L0, L1)`` → ``(batch, 2, L0, L1)``.
    """
    return torch.stack([g - shift(g, 1, -1), shift(g, 0, -1) - g], dim=1)


def mod_2pi(angle: Tensor) -> Tensor:
    """Angles mod 2π in the half-open interval [0, 2π), in the input's dtype (float32 or float64).

    ``torch.remainder(x, 2π)`` rounds to exactly 2π (in the dtype) for x just below a multiple of
    2π, e.g. x = −1e-9 in float32; such values are mapped to 0, the same point of the circle up to
    that rounding. The gradient is 1, as for ``remainder``.
    """
    y = torch.remainder(angle, 2 * math.pi)
    return torch.where(y >= 2 * math.pi, y - 2 * math.pi, y)


def wrap(angle: Tensor) -> Tensor:
    """Map angles to (−π, π]."""
    return torch.pi - torch.remainder(torch.pi - angle, 2 * torch.pi)


def gauge_transform(links: Tensor, alpha: Tensor) -> Tensor:
    """θ_μ(x) → θ_μ(x) + α(x) − α(x+μ̂); ``alpha``: ``(batch, L0, L1, ...)``."""
    d = links.shape[1]
    return torch.stack([links[:, mu] + alpha - shift(alpha, mu) for mu in range(d)], dim=1)


def volume(lattice: tuple[int, ...]) -> int:
    """Number of sites."""
    return math.prod(lattice)
