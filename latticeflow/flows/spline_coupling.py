"""Rational-quadratic spline couplings for scalar fields (the ``[flow] transform = "spline"``).

Like the affine coupling (:mod:`latticeflow.flows.realnvp`), a coupling freezes one checkerboard
parity and maps the other elementwise, here by a monotone rational-quadratic spline of K bins on
[−B, B] with identity tails (:func:`latticeflow.flows.spline.real_line_spline`), whose knots come
from a periodic convolutional net of the frozen sites. The spline's shape can carry the
non-Gaussian single-site distribution of φ⁴, which an affine map of a Gaussian cannot.

The score step takes ∂ℓ/∂x_A in closed form (the spline's (log y')') and the VJP on the frozen
sites by autograd over the layer's graph (:class:`~latticeflow.flows.coupling.MaskedCoupling`).
A fresh coupling is the identity (zero last layer, slopes offset to 1).

Z₂ (``z2``): the mirror M of a spline's raw parameters reverses the order of its widths,
heights and interior slopes; the spline of Mθ is x ↦ −S_θ(−x) (the knots reflect through 0 and
the tails stay the identity). With the conditioner A, the knots θ(F) = A(F) + M A(−F) satisfy
θ(−F) = M θ(F), so h(−x; −F) = −h(x; F): the coupling commutes with φ → −φ. Both halves run
as one batch through the net; a fresh coupling is still the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latticeflow.flows.conditioner import conv_net
from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.spline import (
    SLOPE_OFFSET,
    Knots,
    real_line_knots,
    real_line_spline,
    real_line_spline_inverse,
)


class SplineCoupling(MaskedCoupling):
    """Spline coupling on a boolean mask of active sites (shape = lattice): K = ``n_bins`` bins
    on [−``bound``, ``bound``]; the conditioner returns 3K − 1 channels per site. ``z2``: the
    Z₂-equivariant knots of the module docstring."""

    def __init__(self, active: Tensor, hidden: list[int], kernel_size: int, activation: str,
                 n_bins: int = 8, bound: float = 3.0, z2: bool = False,
                 visible: Tensor | None = None):
        super().__init__(active, visible)
        self.n_bins, self.bound, self.z2 = n_bins, bound, z2
        self.net = conv_net(active.dim(), 1, 3 * n_bins - 1, hidden, kernel_size, activation)

    def _mirror(self, raw: Tensor) -> Tensor:
        """M: widths, heights and interior slopes each in reverse order (channel axis 1)."""
        k = self.n_bins
        return torch.cat([raw[:, :k].flip(1), raw[:, k:2 * k].flip(1), raw[:, 2 * k:].flip(1)],
                         dim=1)

    def condition(self, x: Tensor) -> Knots:
        frozen = torch.where(self.visible, x, 0.0).unsqueeze(1)
        if self.z2:
            out, of_flipped = self.net(torch.cat([frozen, -frozen])).chunk(2)
            out = out + self._mirror(of_flipped)
        else:
            out = self.net(frozen)
        k = self.n_bins
        return real_line_knots(out[:, :k], out[:, k:2 * k], out[:, 2 * k:] + SLOPE_OFFSET,
                               self.bound)

    def transform(self, x: Tensor, cond: Knots, need_dlog: bool = False) -> ElementwiseUpdate:
        y, log_deriv, dlog = real_line_spline(x, cond, self.bound, need_dlog)
        dlog = None if dlog is None else torch.where(self.active, dlog, 0.0)
        return ElementwiseUpdate(torch.where(self.active, y, x),
                                 torch.where(self.active, log_deriv, 0.0), dlog)

    def untransform(self, y: Tensor, cond: Knots) -> tuple[Tensor, Tensor]:
        x, log_deriv = real_line_spline_inverse(y, cond, self.bound)
        return torch.where(self.active, x, y), torch.where(self.active, log_deriv, 0.0)
