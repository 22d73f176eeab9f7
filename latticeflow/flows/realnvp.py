"""RealNVP for scalar fields: affine couplings on checkerboard masks.

Each coupling keeps one checkerboard parity frozen and maps the other as
y_A = x_A · exp(s(x_F)) + t(x_F), with s, t from a periodic convolutional net of the frozen sites.
Then ∂y_A/∂x_A = exp(s), log-derivative s, and ∂s/∂x_A = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latticeflow.flows.conditioner import conv_net
from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.priors import NormalPrior
from latticeflow.lattice import checkerboard


class AffineCoupling(MaskedCoupling):
    """Affine coupling on a boolean mask of active sites (shape = lattice)."""

    def __init__(self, active: Tensor, hidden: list[int], kernel_size: int, activation: str,
                 scale_bound: float = 2.0):
        super().__init__(active)
        self.net = conv_net(active.dim(), 1, 2, hidden, kernel_size, activation)
        self.scale_bound = scale_bound

    def condition(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t) on the active sites, zero on the frozen ones."""
        frozen = torch.where(self.active, 0.0, x)
        out = self.net(frozen.unsqueeze(1))
        # A bounded log-scale per layer keeps early training stable; depth gives the range.
        s = self.scale_bound * torch.tanh(out[:, 0] / self.scale_bound)
        return torch.where(self.active, s, 0.0), torch.where(self.active, out[:, 1], 0.0)

    def transform(self, x: Tensor, cond: tuple[Tensor, Tensor], need_dlog: bool = False
                  ) -> ElementwiseUpdate:
        s, t = cond
        return ElementwiseUpdate(x * torch.exp(s) + t, s)  # ∂s/∂x_A = 0: no dlog_deriv

    def untransform(self, y: Tensor, cond: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        s, t = cond
        return (y - t) * torch.exp(-s), s


def realnvp(lattice: tuple[int, ...], n_couplings: int = 8, hidden: list[int] | None = None,
            kernel_size: int = 3, activation: str = "leaky_relu") -> Flow:
    """A RealNVP flow for a scalar field on ``lattice`` (every extent even), alternating parity.

    Mask period 2: the flow is equivariant under translations by two sites along any axis.
    """
    if any(n % 2 for n in lattice):
        raise ValueError(f"checkerboard couplings need even lattice extents, got {lattice}")
    hidden = [8, 8] if hidden is None else list(hidden)
    couplings = [
        AffineCoupling(checkerboard(lattice, k % 2), hidden, kernel_size, activation)
        for k in range(n_couplings)
    ]
    return Flow(NormalPrior(tuple(lattice)), couplings)
