"""RealNVP for scalar fields: affine couplings on checkerboard masks.

Each coupling keeps one checkerboard parity frozen and maps the other as
y_A = x_A · exp(s(x_F)) + t(x_F), with s, t from a periodic convolutional net of the frozen sites.
Then ∂y_A/∂x_A = exp(s), log-derivative s, and ∂s/∂x_A = 0. The score step's VJP is
∂/∂x_F [Σ_A (x_A e^s + t) s_A + s] = (∂(s, t)/∂x_F)ᵀ (x_A e^s s_A + 1, s_A), the conditioner's
input gradient at that output gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from latticeflow.flows.conditioner import conv_net, input_vjp, recorded
from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.fourier import FourierGaussian, SublatticeFourierGaussian
from latticeflow.flows.multiscale import BlockedLayers
from latticeflow.flows.priors import NormalPrior
from latticeflow.flows.spline_coupling import SplineCoupling
from latticeflow.lattice import checkerboard, stripes
from latticeflow.theories import action_from_table
from latticeflow.theories.phi4_sublattice import Phi4EvenMarginal

#: With ``heat_bath``, the checkerboard parity the flow models; the other one is integrated out.
MODELLED_PARITY = 1

#: Base densities and elementwise maps of the φ⁴ flow (the ``[flow] base`` and ``transform`` keys).
BASES = ("normal", "fourier")
TRANSFORMS = ("affine", "spline")


@dataclass
class AffineConditioning:
    """``s``, ``t``: log-scale and shift, zero on frozen sites, ``(batch, *lattice)``;
    ``values``: the conditioner's recorded layer inputs and raw output (for the score step)."""

    s: Tensor
    t: Tensor
    values: list[Tensor]


class AffineCoupling(MaskedCoupling):
    """Affine coupling on a boolean mask of active sites (shape = lattice)."""

    closed_form_vjp = True

    def __init__(self, active: Tensor, hidden: list[int], kernel_size: int, activation: str,
                 scale_bound: float = 2.0, visible: Tensor | None = None):
        super().__init__(active, visible)
        self.net = conv_net(active.dim(), 1, 2, hidden, kernel_size, activation)
        self.scale_bound = scale_bound

    def condition(self, x: Tensor) -> AffineConditioning:
        """(s, t) on the active sites, zero on the frozen ones."""
        values = recorded(self.net, torch.where(self.visible, x, 0.0).unsqueeze(1))
        out = values[-1]
        # A bounded log-scale per layer keeps early training stable; depth gives the range.
        s = self.scale_bound * torch.tanh(out[:, 0] / self.scale_bound)
        return AffineConditioning(torch.where(self.active, s, 0.0),
                                  torch.where(self.active, out[:, 1], 0.0), values)

    def transform(self, x: Tensor, cond: AffineConditioning, need_dlog: bool = False
                  ) -> ElementwiseUpdate:
        return ElementwiseUpdate(x * torch.exp(cond.s) + cond.t, cond.s)  # ∂s/∂x_A = 0

    def untransform(self, y: Tensor, cond: AffineConditioning) -> tuple[Tensor, Tensor]:
        return (y - cond.t) * torch.exp(-cond.s), cond.s

    def frozen_vjp(self, x: Tensor, cond: AffineConditioning, score_active: Tensor) -> Tensor:
        grad_s = torch.where(self.active, score_active * x * torch.exp(cond.s) + 1, 0.0)
        grad_raw_s = grad_s * (1 - (cond.s / self.scale_bound) ** 2)  # tanh' = 1 − tanh²
        grad_out = torch.stack([grad_raw_s, score_active], dim=1)
        return torch.where(self.visible, input_vjp(self.net, cond.values, grad_out).squeeze(1), 0.0)


def realnvp(lattice: tuple[int, ...], n_couplings: int = 8, hidden: Sequence[int] = (16, 16),
            kernel_size: int = 3, activation: str = "leaky_relu", base: str = "normal",
            fourier_terms: int = 3, transform: str = "affine", n_bins: int = 8,
            spline_bound: float = 3.0, z2: bool = False, coarse: Sequence[int] = (),
            coarse_couplings: int = 4, heat_bath: bool = False,
            action_params: Mapping[str, Any] | None = None) -> Flow:
    """A coupling flow for a scalar field on ``lattice`` (every extent even), alternating parity.

    ``base``: ``"normal"`` (a standard normal per site) or ``"fourier"`` (the same noise through
    a learnable :class:`~latticeflow.flows.fourier.FourierGaussian` of ``fourier_terms``
    coefficients, before the couplings). ``transform``: ``"affine"`` (RealNVP) or ``"spline"``
    (:class:`~latticeflow.flows.spline_coupling.SplineCoupling`, ``n_bins`` bins on
    [−``spline_bound``, ``spline_bound``]; ``z2``: Z₂-equivariant splines). Mask period 2: the
    flow is equivariant under translations by two sites along any axis, and with ``z2`` (both
    bases are even) under φ → −φ.

    ``coarse``: extents C of coarse lattices (C sites on every axis; C even and dividing every
    extent), applied coarse to fine after the base: each gets ``coarse_couplings`` couplings of
    the same kind on the block means (:class:`~latticeflow.flows.multiscale.BlockedLayers`),
    before the ``n_couplings`` couplings on the lattice itself. The coarse levels keep Z₂
    (blocking is linear) but are equivariant only under translations by two blocks.

    ``heat_bath``: the even sites are integrated out exactly (needs ``action_params``, the φ⁴
    card's parameters; :class:`~latticeflow.theories.phi4_sublattice.Phi4EvenMarginal`). Every
    layer then acts on the odd sites alone (the base on that sublattice, coarse levels on its
    block means, couplings on the sublattice's own checkerboard, the odd sites with x₀ even
    against those with x₀ odd) and leaves the even entries as base noise; the flow is trained
    against the odd sites' marginal (:attr:`Flow.heat_bath`), and :meth:`Flow.sample` draws
    the even sites from their exact conditional.
    """
    if any(n % 2 for n in lattice):
        raise ValueError(f"checkerboard couplings need even lattice extents, got {lattice}")
    hidden = list(hidden)
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; choose one of {', '.join(BASES)}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if z2 and transform != "spline":
        raise ValueError("z2 needs the spline transform")
    if any(c % 2 or c < 2 or kernel_size // 2 > c for c in coarse):
        raise ValueError(f"coarse lattice extents must be even and at least half the kernel "
                         f"size, got {list(coarse)}")

    marginal = None
    if heat_bath:
        if action_params is None or len(lattice) < 2:
            raise ValueError("heat_bath needs a lattice of two or more axes and the action's "
                             "parameters")
        marginal = Phi4EvenMarginal(action_from_table({"theory": "phi4", **action_params}))
    parity = MODELLED_PARITY if heat_bath else None

    def masks(grid: tuple[int, ...], k: int, sublattice: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(active, visible): visible None reads every frozen site."""
        if not sublattice:
            return checkerboard(grid, k % 2), None
        modelled = checkerboard(grid, MODELLED_PARITY)
        active = modelled & stripes(grid, 0, k % 2, 2)
        return active, modelled & ~active

    def couplings(grid: tuple[int, ...], count: int, sublattice: bool = False
                  ) -> list[torch.nn.Module]:
        layers = []
        for k in range(count):
            active, visible = masks(grid, k, sublattice)
            layers.append(
                AffineCoupling(active, hidden, kernel_size, activation, visible=visible)
                if transform == "affine" else
                SplineCoupling(active, hidden, kernel_size, activation, n_bins, spline_bound, z2,
                               visible=visible))
        return layers

    layers: list[torch.nn.Module] = []
    if base == "fourier":
        layers.append(FourierGaussian(tuple(lattice), fourier_terms) if parity is None else
                      SublatticeFourierGaussian(tuple(lattice), parity, fourier_terms))
    for c in coarse:
        grid = (c,) * len(lattice)
        layers.append(BlockedLayers(tuple(lattice), grid, couplings(grid, coarse_couplings),
                                    parity))
    layers += couplings(tuple(lattice), n_couplings, sublattice=heat_bath)
    return Flow(NormalPrior(tuple(lattice)), layers, heat_bath=marginal)
