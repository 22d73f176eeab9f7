"""Base densities q₀ of the flows: a standard normal per site (φ⁴) and uniform link angles (U(1)).

Both are densities with respect to the plain Lebesgue measure (dφ per site, dθ per link).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Prior:
    """A factorised base density over fields of shape ``field_shape``."""

    def __init__(self, field_shape: tuple[int, ...]):
        self.field_shape = tuple(field_shape)
        self.size = math.prod(self.field_shape)

    def sample(self, n: int, *, device=None, dtype=None, generator=None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        """log q₀(z), shape ``(batch,)``."""
        raise NotImplementedError

    def score(self, z: Tensor) -> Tensor:
        """∇_z log q₀(z), same shape as ``z``."""
        raise NotImplementedError


class NormalPrior(Prior):
    """z ~ N(0, 1) independently on every site."""

    def sample(self, n, *, device=None, dtype=None, generator=None):
        return torch.randn((n, *self.field_shape), device=device, dtype=dtype, generator=generator)

    def log_prob(self, z):
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * self.size * math.log(2 * math.pi)

    def score(self, z):
        return -z


class UniformAnglePrior(Prior):
    """θ ~ U[0, 2π) independently on every link (density 1/2π per link)."""

    def sample(self, n, *, device=None, dtype=None, generator=None):
        u = torch.rand((n, *self.field_shape), device=device, dtype=dtype, generator=generator)
        return 2 * math.pi * u

    def log_prob(self, z):
        return z.new_full((z.shape[0],), -self.size * math.log(2 * math.pi))

    def score(self, z):
        return torch.zeros_like(z)
