"""Gauge-equivariant flows for 2D U(1) links: plaquette couplings with NCP maps.

A coupling updates the links θ_μ on a stripe x_ν ≡ k (mod 4), ν ≠ μ. Each such link enters
exactly one *active* plaquette with coefficient +1 (P(x) for μ = 0, P(x − 0̂) for μ = 1). The
active plaquette angle u = P mod 2π is mapped by an NCP map h whose parameters come from a
convolutional net of (cos P, sin P) on the *frozen* plaquettes (those containing no updated
link), and the link absorbs the change: θ_μ → θ_μ + h(u) − u (stored mod 2π). Hence
∂θ'/∂θ = h'(u) and ∂log h'/∂θ = h''/h'(u). Plaquettes are gauge invariant, so the flow commutes
with gauge transformations; with a base density uniform in the links, q is gauge invariant.

With ``loop_length`` n ≥ 2 the conditioner also sees, on the active rows, the 1×k Wilson loops
(k = 2..n) that start at the active plaquette and extend across the updated link, through the
passive plaquette (where the link enters with −1) and on in that direction. The link cancels in
them, and they contain no other updated link for k ≤ 4 (the mask period), so they are unchanged
by the coupling. They carry what the active plaquette's conditional density needs: for the
Wilson action, p(P_active | R, rest) ∝ exp(β cos P_active + β cos(R − P_active)) with R the 1×2
loop; the longer loops sum the rows that later couplings of the same direction will update.
Cycling μ ∈ {0, 1} and k ∈ {0, 1, 2, 3} (mask period 4) covers every link.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latticeflow.flows.conditioner import conv_net
from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.ncp import TWO_PI, NCPParams, ncp, ncp_inverse
from latticeflow.flows.plaquette_prior import PlaquettePrior
from latticeflow.flows.priors import UniformAnglePrior
from latticeflow.lattice import plaquette, stripes

MASK_PERIOD = 4


class PlaquetteCoupling(MaskedCoupling):
    """Updates links θ_mu with x_{1−mu} ≡ offset (mod 4) through NCP maps of their plaquettes.

    The NCP maps, and the conditioner's last layer, are evaluated only on the active plaquette
    rows (a quarter of the lattice), gathered with ``index_select`` along the stripe axis.
    """

    def __init__(self, lattice: tuple[int, int], mu: int, offset: int, n_mixture: int,
                 hidden: list[int], kernel_size: int, activation: str, loop_length: int = 2):
        nu = 1 - mu
        active = torch.zeros((2, *lattice), dtype=torch.bool)
        active[mu] = stripes(lattice, nu, offset, MASK_PERIOD)
        super().__init__(active)
        self.mu, self.n_mixture = mu, n_mixture
        self.axis = 1 + nu  # the stripe axis of a (batch, L0, L1) tensor
        # Active plaquettes sit where the updated link enters with +1: P(x) for μ = 0,
        # P(x − 0̂) for μ = 1, i.e. one row lower along axis 0.
        lag = 0 if mu == 0 else 1
        n = lattice[nu]
        rows = (MASK_PERIOD * torch.arange(n // MASK_PERIOD) + offset - lag) % n
        self.register_buffer("plaq_rows", rows, persistent=False)
        # The updated links' rows, in the order of their active plaquette rows.
        self.register_buffer("link_rows", (MASK_PERIOD * torch.arange(n // MASK_PERIOD) + offset)
                             % n, persistent=False)
        frozen = stripes(lattice, nu, offset + 1, MASK_PERIOD) | stripes(
            lattice, nu, offset + 2, MASK_PERIOD)
        active_plaq = stripes(lattice, nu, offset - lag, MASK_PERIOD)
        # The passive plaquette is one row below the active one for μ = 0, one above for μ = 1.
        self.passive_shift = 1 if mu == 0 else -1
        if not 1 <= loop_length <= MASK_PERIOD:
            raise ValueError(f"loop_length must be in 1..{MASK_PERIOD}, got {loop_length}")
        self.loop_length = loop_length
        in_channels = 2 * loop_length
        # Per input channel: frozen plaquettes for (cos P, sin P), active rows for the loops.
        self.register_buffer("feature_mask", torch.stack(
            [frozen, frozen] + [active_plaq] * (in_channels - 2)), persistent=False)
        self.net = conv_net(2, in_channels, 2 * n_mixture + 1, hidden, kernel_size, activation)
        # The last layer is evaluated on the active plaquette rows only (a quarter of the sites).
        self.register_buffer("plaq_windows", self.net[-1].windows(rows, n), persistent=False)

    def condition(self, x: Tensor) -> NCPParams:
        """NCP parameters on the active plaquette rows, from (cos P, sin P) of frozen plaquettes
        and (cos, sin) of the 1×k loops (k = 2..loop_length) on the active rows."""
        plaq = plaquette(x)
        angles, loop = [plaq], plaq
        for k in range(1, self.loop_length):
            loop = loop + torch.roll(plaq, k * self.passive_shift, dims=self.axis)
            angles.append(loop)
        angles = torch.stack(angles, dim=1)
        # Channels (cos P, sin P, cos L₂, sin L₂, ...), each kept where it is read.
        features = torch.stack([angles.cos(), angles.sin()], dim=2).flatten(1, 2)
        features = torch.where(self.feature_mask, features, 0.0)
        out = self.net[-1].at_rows(self.net[:-1](features), self.axis + 1, self.plaq_windows)
        k = self.n_mixture
        return NCPParams(out[:, :k], torch.softmax(out[:, k:2 * k], dim=1), out[:, 2 * k])

    def _active_angles(self, x: Tensor) -> Tensor:
        """Active plaquette angles in [0, 2π), ``(batch, ...)`` on the active rows."""
        return torch.remainder(plaquette(x).index_select(self.axis, self.plaq_rows), TWO_PI)

    def _to_links(self, rows: Tensor) -> Tensor:
        """Place a quantity on the active plaquette rows onto the updated links (zero elsewhere)."""
        shape = (rows.shape[0], *self.active.shape[1:])
        on_link = torch.index_copy(rows.new_zeros(shape), self.axis, self.link_rows, rows)
        zero = rows.new_zeros(shape)
        return torch.stack([on_link, zero] if self.mu == 0 else [zero, on_link], dim=1)

    def transform(self, x: Tensor, cond: NCPParams, need_dlog: bool = False
                  ) -> ElementwiseUpdate:
        u = self._active_angles(x)
        h, dh, d2h = ncp(u, cond, need_second=need_dlog)
        y = torch.where(self.active, torch.remainder(x + self._to_links(h - u), TWO_PI), x)
        dlog = None if d2h is None else self._to_links(d2h / dh)
        return ElementwiseUpdate(y, self._to_links(torch.log(dh)), dlog)

    def untransform(self, y: Tensor, cond: NCPParams) -> tuple[Tensor, Tensor]:
        u, target, dh = ncp_inverse(self._active_angles(y), cond)
        x = torch.where(self.active, torch.remainder(y - self._to_links(target - u), TWO_PI), y)
        return x, self._to_links(torch.log(dh))


PRIORS = ("uniform", "plaquette")


def u1_equivariant(lattice: tuple[int, int], n_couplings: int = 16, n_mixture: int = 6,
                   hidden: list[int] | None = None, kernel_size: int = 3,
                   activation: str = "leaky_relu", loop_length: int = 2,
                   prior: str = "uniform", beta: float | None = None) -> Flow:
    """Gauge-equivariant flow on a 2D lattice with extents divisible by 4.

    ``prior``: ``"uniform"`` (Haar: independent uniform links) or ``"plaquette"``
    (:class:`~latticeflow.flows.plaquette_prior.PlaquettePrior`, independent von Mises plaquettes
    of concentration ``beta``, the Wilson action's β; exact on an open lattice, so the couplings
    only learn what the periodic boundary changes).

    Coupling k updates direction μ = k mod 2. The stripes of a direction are visited in the order
    that moves away from the passive plaquettes: an update changes its active plaquette row and,
    through the passive row, the row the previous coupling of that direction left alone. So
    offsets run −(k // 2) mod 4 for μ = 0 (passive row below) and (k // 2) mod 4 for μ = 1
    (passive row above). Equivariant under translations by 4 sites (by the mask period).
    """
    if len(lattice) != 2 or any(n % MASK_PERIOD for n in lattice):
        raise ValueError(f"the U(1) flow needs a 2D lattice with extents divisible by "
                         f"{MASK_PERIOD}, got {lattice}")
    hidden = [8, 8] if hidden is None else list(hidden)
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if prior == "plaquette" and beta is None:
        raise ValueError("the plaquette prior needs the action's beta")
    base = (UniformAnglePrior((2, *lattice)) if prior == "uniform"
            else PlaquettePrior(tuple(lattice), beta))
    couplings = [
        PlaquetteCoupling(tuple(lattice), k % 2, (k // 2 if k % 2 else -(k // 2)) % MASK_PERIOD,
                          n_mixture, hidden, kernel_size, activation, loop_length)
        for k in range(n_couplings)
    ]
    return Flow(base, couplings)
