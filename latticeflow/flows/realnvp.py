"""RealNVP for scalar fields: affine couplings on checkerboard masks.

Each coupling keeps one checkerboard parity frozen and maps the other as
y_A = x_A · exp(s(x_F)) + t(x_F), with s, t from a periodic convolutional net of the frozen sites.
Then ∂y_A/∂x_A = exp(s), log-derivative s, and ∂s/∂x_A = 0. The score step's VJP is
∂/∂x_F [Σ_A (x_A e^s + t) s_A + s] = (∂(s, t)/∂x_F)ᵀ (x_A e^s s_A + 1, s_A), the conditioner's
input gradient at that output gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from latticeflow.flows.conditioner import conv_net, input_vjp, recorded
from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.priors import NormalPrior
from latticeflow.lattice import checkerboard


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
                 scale_bound: float = 2.0):
        super().__init__(active)
        self.net = conv_net(active.dim(), 1, 2, hidden, kernel_size, activation)
        self.scale_bound = scale_bound

    def condition(self, x: Tensor) -> AffineConditioning:
        """(s, t) on the active sites, zero on the frozen ones."""
        frozen = torch.where(self.active, 0.0, x)
        values = recorded(self.net, frozen.unsqueeze(1))
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
        return input_vjp(self.net, cond.values, grad_out).squeeze(1)


def realnvp(lattice: tuple[int, ...], n_couplings: int = 8, hidden: Sequence[int] = (16, 16),
            kernel_size: int = 3, activation: str = "leaky_relu") -> Flow:
    """A RealNVP flow for a scalar field on ``lattice`` (every extent even), alternating parity.

    Mask period 2: the flow is equivariant under translations by two sites along any axis.
    """
    if any(n % 2 for n in lattice):
        raise ValueError(f"checkerboard couplings need even lattice extents, got {lattice}")
    hidden = list(hidden)
    couplings = [
        AffineCoupling(checkerboard(lattice, k % 2), hidden, kernel_size, activation)
        for k in range(n_couplings)
    ]
    return Flow(NormalPrior(tuple(lattice)), couplings)
