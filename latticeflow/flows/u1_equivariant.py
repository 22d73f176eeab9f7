"""Gauge-equivariant flows for 2D U(1) links: plaquette couplings with NCP maps.

A coupling updates the links θ_μ on a stripe x_ν ≡ k (mod 4), ν ≠ μ. Each such link enters
exactly one *active* plaquette with coefficient +1 (P(x) for μ = 0, P(x − 0̂) for μ = 1). The
active plaquette angle u = P mod 2π is mapped by an NCP map h whose parameters come from a
convolutional net of (cos P, sin P) on the *frozen* plaquettes (those containing no updated
link), and the link absorbs the change: θ_μ → θ_μ + h(u) − u (stored mod 2π). Hence
∂θ'/∂θ = h'(u) and ∂log h'/∂θ = h''/h'(u). Plaquettes are gauge invariant, so the flow commutes
with gauge transformations; with a base density uniform in the links, q is gauge invariant.
Cycling μ ∈ {0, 1} and k ∈ {0, 1, 2, 3} (mask period 4) covers every link.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latticeflow.flows.conditioner import conv_net
from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.ncp import TWO_PI, NCPParams, ncp, ncp_inverse
from latticeflow.flows.priors import UniformAnglePrior
from latticeflow.lattice import plaquette, stripes

MASK_PERIOD = 4


class PlaquetteCoupling(MaskedCoupling):
    """Updates links θ_mu with x_{1−mu} ≡ offset (mod 4) through NCP maps of their plaquettes."""

    def __init__(self, lattice: tuple[int, int], mu: int, offset: int, n_mixture: int,
                 hidden: list[int], kernel_size: int, activation: str):
        nu = 1 - mu
        link_stripe = stripes(lattice, nu, offset, MASK_PERIOD)
        active = torch.zeros((2, *lattice), dtype=torch.bool)
        active[mu] = link_stripe
        super().__init__(active)
        self.mu = mu
        self.n_mixture = n_mixture
        # Active plaquettes sit where the updated link enters with +1: P(x) for μ = 0,
        # P(x − 0̂) for μ = 1, i.e. on the stripe shifted by −1 along axis 0.
        plaq_offset = offset if mu == 0 else offset - 1
        self.register_buffer("active_plaq", stripes(lattice, nu, plaq_offset, MASK_PERIOD),
                             persistent=False)
        frozen = stripes(lattice, nu, offset + 1, MASK_PERIOD) | stripes(
            lattice, nu, offset + 2, MASK_PERIOD)
        self.register_buffer("frozen_plaq", frozen, persistent=False)
        self.net = conv_net(2, 2, 2 * n_mixture + 1, hidden, kernel_size, activation)

    def _params(self, plaq: Tensor) -> NCPParams:
        features = torch.stack([torch.cos(plaq), torch.sin(plaq)], dim=1)
        out = self.net(torch.where(self.frozen_plaq, features, 0.0)).movedim(1, -1)
        k = self.n_mixture
        return NCPParams(out[..., :k], torch.softmax(out[..., k:2 * k], dim=-1), out[..., 2 * k])

    def _to_links(self, per_plaquette: Tensor) -> Tensor:
        """Place a per-plaquette quantity (zero off the active plaquettes) on the updated links."""
        on_plaq = torch.where(self.active_plaq, per_plaquette, 0.0)
        on_link = on_plaq if self.mu == 0 else torch.roll(on_plaq, shifts=1, dims=1)
        zero = torch.zeros_like(on_link)
        return torch.stack([on_link, zero] if self.mu == 0 else [zero, on_link], dim=1)

    def update(self, x: Tensor) -> ElementwiseUpdate:
        plaq = plaquette(x)
        u = torch.remainder(plaq, TWO_PI)
        h, dh, d2h = ncp(u, self._params(plaq))
        y = torch.where(self.active, torch.remainder(x + self._to_links(h - u), TWO_PI), x)
        return ElementwiseUpdate(y, self._to_links(torch.log(dh)), self._to_links(d2h / dh))

    def invert(self, y: Tensor) -> tuple[Tensor, Tensor]:
        plaq = plaquette(y)
        v = torch.remainder(plaq, TWO_PI)
        u, target, dh = ncp_inverse(v, self._params(plaq))
        x = torch.where(self.active, torch.remainder(y - self._to_links(target - u), TWO_PI), y)
        return x, self._to_links(torch.log(dh))


def u1_equivariant(lattice: tuple[int, int], n_couplings: int = 16, n_mixture: int = 6,
                   hidden: list[int] | None = None, kernel_size: int = 3,
                   activation: str = "leaky_relu") -> Flow:
    """Gauge-equivariant flow on a 2D lattice with extents divisible by 4.

    Coupling k updates direction μ = k mod 2 on stripe offset (k // 2) mod 4. Equivariant under
    translations by 4 sites (by the mask period).
    """
    if len(lattice) != 2 or any(n % MASK_PERIOD for n in lattice):
        raise ValueError(f"the U(1) flow needs a 2D lattice with extents divisible by "
                         f"{MASK_PERIOD}, got {lattice}")
    hidden = [8, 8] if hidden is None else list(hidden)
    couplings = [
        PlaquetteCoupling(tuple(lattice), k % 2, (k // 2) % MASK_PERIOD, n_mixture, hidden,
                          kernel_size, activation)
        for k in range(n_couplings)
    ]
    return Flow(UniformAnglePrior((2, *lattice)), couplings)
