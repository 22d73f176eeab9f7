"""The independent-plaquette base density for 2D U(1) link fields.

In two dimensions the plaquettes P(x) of all sites but one, together with the two Polyakov
loops (holonomies) H₀, H₁, are coordinates of the gauge-invariant content of a link field: every
field is a gauge transform of the one built from them in a fixed gauge, and the last plaquette is
fixed by Σₓ P(x) ≡ 0 (mod 2π). On an open lattice (no such constraint) the Wilson action makes the
plaquettes independent von Mises variables, p(P) ∝ exp(β cos P). This prior uses that solution:

* pick a site x* uniformly; draw P(x), x ≠ x*, independently from von Mises(κ) and set P(x*) by
  the constraint; draw H₀, H₁ uniformly on [0, 2π);
* build links with these plaquettes and holonomies in a comb gauge (:func:`comb_gauge_links`),
  then apply a uniformly random gauge transformation.

Because (plaquettes but one, holonomies) are the image of the links under a surjective
homomorphism of tori whose fibres are the gauge orbits, and the random gauge transformation is
uniform on the fibre, the density with respect to the Lebesgue measure dθ on the 2V links is

    log q₀(θ) = log[(1/V) Σ_{x*} Π_{x≠x*} e^{κ cos P(x)} / I₀(κ)] − 2V log 2π
              = Σₓ c(x) + logsumexp_{x*}(−c(x*)) − log V − (V − 1) log I₀(κ) − 2V log 2π,

with c(x) = κ cos P(x). It depends on the plaquettes only, so it is gauge and translation
invariant, and for κ → 0 it is the uniform link density. With κ = β its importance weight
against the Wilson action, w ∝ 1 / Σₓ e^{−β cos P(x)}, is bounded; the ESS of the prior alone on
8×8 is about 0.94 at β = 2 and 0.46 at β = 6.
"""

from __future__ import annotations

import math

import scipy.special
import torch
from torch import Tensor

from latticeflow.flows.priors import Prior
from latticeflow.lattice import gauge_transform, mod_2pi, plaquette, plaquette_adjoint

TWO_PI = 2 * math.pi


def von_mises(concentration: float, shape: tuple[int, ...], *, device=None, dtype=None,
              generator: torch.Generator | None = None) -> Tensor:
    """Angles in (−π, π] with density e^{κ cos P} / (2π I₀(κ)), κ = ``concentration`` ≥ 0.

    Best and Fisher's wrapped-Cauchy rejection sampler (Appl. Statist. 28 (1979) 152), vectorised:
    every round redraws the rejected entries. The acceptance rate is at least 0.66 for every κ.
    Computed in float64 and returned in ``dtype``.

    The wrapped-Cauchy parameter ρ = (τ − √(2τ)) / (2κ), τ = 1 + √(1 + 4κ²), is evaluated as
    ρ = 2κ / (τ + √(2τ)) (equal, since τ(τ − 2) = 4κ²), which has no cancellation: ρ ≈ κ/2 and
    r = (1 + ρ²)/(2ρ) ≈ 1/κ stay exact to rounding for small κ. Below κ = 2⁻⁵⁴ the uniform
    density is returned instead (κ = 0 exactly, and where r would overflow): the density ratio to
    uniform, e^{κ cos P}/I₀(κ), then lies within (1 − 2⁻⁵⁴, 1 + 2⁻⁵⁴) and rounds to 1 in float64,
    so the two distributions agree to float64 resolution.
    """
    kappa = float(concentration)
    if not kappa >= 0:
        raise ValueError(f"the von Mises concentration must be >= 0, got {concentration}")
    dtype = dtype or torch.get_default_dtype()
    if kappa < 2.0**-54:
        u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
        return (math.pi - TWO_PI * u).to(dtype)
    tau = 1 + math.sqrt(1 + 4 * kappa * kappa)
    rho = 2 * kappa / (tau + math.sqrt(2 * tau))
    r = (1 + rho * rho) / (2 * rho)
    out = torch.empty(math.prod(shape), dtype=torch.float64, device=device)
    todo = torch.arange(out.numel(), device=device)
    while todo.numel():
        u = torch.rand((3, todo.numel()), dtype=torch.float64, device=device,
                       generator=generator)
        z = torch.cos(math.pi * u[0])
        f = (1 + r * z) / (r + z)
        c = kappa * (r - f)
        accept = (c * (2 - c) > u[1]) | (torch.log(c / u[1]) + 1 - c >= 0)
        angle = torch.sign(u[2] - 0.5) * torch.acos(f.clamp(-1.0, 1.0))
        out[todo[accept]] = angle[accept]
        todo = todo[~accept]
    return out.view(shape).to(dtype)


def comb_gauge_links(plaq: Tensor, holonomy: Tensor) -> Tensor:
    """Links with plaquettes ``plaq`` (mod 2π) and Polyakov loops ``holonomy`` in a comb gauge.

    ``plaq``: ``(batch, L0, L1)`` with Σₓ P(x) ≡ 0 (mod 2π) (the value at (L0−1, L1−1) is not
    read: the constraint fixes it); ``holonomy``: ``(batch, 2)``, the sums of θ₀ along the row
    x₁ = 0 and of θ₁ along the column x₀ = 0. Gauge: θ₀(x₀, 0) = 0 for x₀ < L0−1 and
    θ₁(x₀, x₁) = 0 for x₁ < L1−1 (a maximal tree). Then P(x) = θ₀(x) − θ₀(x+1̂) below the top
    row fixes θ₀ upwards, and the top row fixes θ₁(·, L1−1) along x₀. Returns
    ``(batch, 2, L0, L1)``.
    """
    batch, l0, l1 = plaq.shape
    theta0 = plaq.new_zeros((batch, l0, l1))
    theta1 = plaq.new_zeros((batch, l0, l1))
    theta0[:, l0 - 1, 0] = holonomy[:, 0]
    column_sums = torch.cumsum(plaq, dim=2)
    theta0[:, :, 1:] = theta0[:, :, :1] - column_sums[:, :, :-1]
    theta1[:, 0, l1 - 1] = holonomy[:, 1]
    theta1[:, 1:, l1 - 1] = holonomy[:, 1:2] + torch.cumsum(column_sums[:, :-1, -1], dim=1)
    return torch.stack([theta0, theta1], dim=1)


def _translate(links: Tensor, by: Tensor) -> Tensor:
    """Per-configuration translation θ_μ(x) → θ_μ(x + by[b]); ``by``: ``(batch, 2)`` ints."""
    batch, _, l0, l1 = links.shape
    rows = (torch.arange(l0, device=links.device) + by[:, :1]) % l0          # (batch, L0)
    cols = (torch.arange(l1, device=links.device) + by[:, 1:]) % l1          # (batch, L1)
    index = torch.arange(batch, device=links.device)[:, None, None]
    return links.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class PlaquettePrior(Prior):
    """Independent von Mises(κ) plaquettes, symmetrised over the constrained one (module doc).

    Fields are link angles ``(batch, 2, L0, L1)`` in [0, 2π); densities are with respect to dθ.
    """

    def __init__(self, lattice: tuple[int, int], concentration: float):
        if len(lattice) != 2:
            raise ValueError(f"the plaquette prior needs a 2D lattice, got {lattice}")
        if not concentration > 0:
            raise ValueError(f"the plaquette prior needs a concentration > 0, got "
                             f"{concentration}")
        super().__init__((2, *lattice))
        self.lattice = tuple(lattice)
        self.concentration = float(concentration)
        volume = self.lattice[0] * self.lattice[1]
        log_i0 = math.log(scipy.special.i0e(self.concentration)) + self.concentration
        self._constant = -math.log(volume) - (volume - 1) * log_i0 - 2 * volume * math.log(TWO_PI)

    def sample(self, n, *, device=None, dtype=None, generator=None):
        dtype = dtype or torch.get_default_dtype()
        plaq = von_mises(self.concentration, (n, *self.lattice), device=device, dtype=dtype,
                         generator=generator)
        uniform = torch.rand((n, 2 + math.prod(self.lattice)), device=device, dtype=dtype,
                             generator=generator) * TWO_PI
        links = comb_gauge_links(plaq, uniform[:, :2])
        site = torch.randint(0, math.prod(self.lattice), (n,), device=device,
                             generator=generator)
        by = torch.stack([site // self.lattice[1], site % self.lattice[1]], dim=1)
        links = _translate(links, by)
        links = gauge_transform(links, uniform[:, 2:].view(n, *self.lattice))
        return mod_2pi(links)

    def log_prob(self, z):
        c = self.concentration * torch.cos(plaquette(z)).flatten(1)
        return c.sum(1) + torch.logsumexp(-c, dim=1) + self._constant

    def score(self, z):
        p = plaquette(z)
        c = self.concentration * torch.cos(p)
        exclusion = torch.softmax(-c.flatten(1), dim=1).view_as(c)
        return plaquette_adjoint(-self.concentration * torch.sin(p) * (1 - exclusion))

    def __repr__(self) -> str:
        return f"PlaquettePrior(lattice={self.lattice}, concentration={self.concentration})"


__all__ = ["PlaquettePrior", "comb_gauge_links", "von_mises"]
