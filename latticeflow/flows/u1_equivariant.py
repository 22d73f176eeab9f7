"""Gauge-equivariant flows for 2D U(1) links: plaquette couplings with NCP or spline maps.

A coupling updates the links θ_μ on a stripe x_ν ≡ k (mod 4), ν ≠ μ. Each such link enters
exactly one *active* plaquette with coefficient +1 (P(x) for μ = 0, P(x − 0̂) for μ = 1). The
active plaquette angle u = P mod 2π is mapped by a circle map h whose parameters come from a
convolutional net of (cos P, sin P) on the *frozen* plaquettes (those containing no updated
link), and the link absorbs the change: θ_μ → θ_μ + h(u) − u (stored mod 2π). Hence
∂θ'/∂θ = h'(u) and ∂log h'/∂θ = h''/h'(u). Plaquettes are gauge invariant, so the flow commutes
with gauge transformations; with a base density uniform in the links, q is gauge invariant.
The map (DESIGN §8) is an NCP map (:class:`PlaquetteCoupling`, ``transform = "ncp"``: mixtures
of tan-transforms, inverted numerically) or a circular rational-quadratic spline
(:class:`PlaquetteSplineCoupling`, ``transform = "spline"``: analytic inverse).

With ``loop_length`` n ≥ 2 the conditioner also sees, on the active rows, the 1×k Wilson loops
(k = 2..n) that start at the active plaquette and extend across the updated link, through the
passive plaquette (where the link enters with −1) and on in that direction. The link cancels in
them, and they contain no other updated link for k ≤ 4 (the mask period), so they are unchanged
by the coupling. They carry what the active plaquette's conditional density needs: for the
Wilson action, p(P_active | R, rest) ∝ exp(β cos P_active + β cos(R − P_active)) with R the 1×2
loop; the longer loops sum the rows that later couplings of the same direction will update.
Cycling μ ∈ {0, 1} and k ∈ {0, 1, 2, 3} (mask period 4) covers every link.

Score step (the fast path's VJP on the frozen links), in closed form for NCP couplings (spline
couplings take it by autograd over the layer's graph): with s the score on the updated links,
the NCP part gives the gradient of Σ [s (h(u) − u) + log h'(u)] in u and in the
NCP parameters (:func:`~latticeflow.flows.ncp.ncp_log_deriv_vjp`); the parameter gradient runs
back through the softmax and the conditioner (:func:`~latticeflow.flows.conditioner.input_vjp`)
to the features, whose angles' gradient is −sin A ∂/∂cos A + cos A ∂/∂sin A; the loops' and the
active plaquettes' gradients are gathered on the plaquettes, and the plaquettes' on the links.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from latticeflow.flows.conditioner import conv_net, input_vjp, recorded
from latticeflow.flows.coupling import ElementwiseUpdate, MaskedCoupling
from latticeflow.flows.flow import Flow
from latticeflow.flows.ncp import NCPParams, ncp, ncp_inverse, ncp_log_deriv_vjp
from latticeflow.flows.plaquette_prior import PlaquettePrior
from latticeflow.flows.priors import UniformAnglePrior
from latticeflow.flows.spline import (
    SLOPE_OFFSET,
    Knots,
    circular_knots,
    circular_spline,
    circular_spline_inverse,
)
from latticeflow.lattice import mod_2pi, plaquette, plaquette_adjoint, stripes

MASK_PERIOD = 4


@dataclass
class PlaquetteConditioning:
    """``ncp``: the NCP parameters on the active plaquette rows; ``values``: the inputs of the
    conditioner's layers but the last (features first) and the last one's input."""

    ncp: NCPParams
    values: list[Tensor]


class PlaquetteCouplingBase(MaskedCoupling):
    """Updates links θ_mu with x_{1−mu} ≡ offset (mod 4) through circle maps of their plaquettes.

    The geometry, the conditioner and the link update are shared; subclasses choose the map and
    how the conditioner's ``n_outputs`` channels parametrise it. The maps, and the conditioner's
    last layer, are evaluated only on the active plaquette rows (a quarter of the lattice),
    gathered with ``index_select`` along the stripe axis.
    """

    def __init__(self, lattice: tuple[int, int], mu: int, offset: int, n_outputs: int,
                 hidden: list[int], kernel_size: int, activation: str, loop_length: int = 2):
        nu = 1 - mu
        active = torch.zeros((2, *lattice), dtype=torch.bool)
        active[mu] = stripes(lattice, nu, offset, MASK_PERIOD)
        super().__init__(active)
        self.mu = mu
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
        self.net = conv_net(2, in_channels, n_outputs, hidden, kernel_size, activation)
        # The last layer is evaluated on the active plaquette rows only (a quarter of the sites).
        self.register_buffer("plaq_windows", self.net[-1].windows(rows, n), persistent=False)

    def _conditioner(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The conditioner's output on the active plaquette rows, ``(batch, n_outputs, ...)``,
        from (cos P, sin P) of frozen plaquettes and (cos, sin) of the 1×k loops
        (k = 2..loop_length) on the active rows; and the inputs of its layers but the last
        (features first) with the last one's input."""
        plaq = plaquette(x)
        angles, loop = [plaq], plaq
        for k in range(1, self.loop_length):
            loop = loop + torch.roll(plaq, k * self.passive_shift, dims=self.axis)
            angles.append(loop)
        angles = torch.stack(angles, dim=1)
        # Channels (cos P, sin P, cos L₂, sin L₂, ...), each kept where it is read.
        features = torch.stack([angles.cos(), angles.sin()], dim=2).flatten(1, 2)
        features = torch.where(self.feature_mask, features, 0.0)
        values = recorded(self.net[:-1], features)
        return self.net[-1].at_rows(values[-1], self.axis + 1, self.plaq_windows), values

    def _active_angles(self, x: Tensor) -> Tensor:
        """Active plaquette angles in [0, 2π), ``(batch, ...)`` on the active rows."""
        return mod_2pi(plaquette(x).index_select(self.axis, self.plaq_rows))

    def _to_links(self, rows: Tensor) -> Tensor:
        """Place a quantity on the active plaquette rows onto the updated links (zero elsewhere)."""
        shape = (rows.shape[0], *self.active.shape[1:])
        on_link = torch.index_copy(rows.new_zeros(shape), self.axis, self.link_rows, rows)
        zero = rows.new_zeros(shape)
        return torch.stack([on_link, zero] if self.mu == 0 else [zero, on_link], dim=1)

    def _update(self, x: Tensor, u: Tensor, h: Tensor, log_dh: Tensor, dlog: Tensor | None
                ) -> ElementwiseUpdate:
        """The links' update for the map u → h of the active plaquettes (``u``, ``h``,
        ``log_dh`` = log h'(u) and ``dlog`` = (log h')'(u) or ``None``, on the active rows): the
        updated links move by h − u (mod 2π), and the others stay."""
        y = torch.where(self.active, mod_2pi(x + self._to_links(h - u)), x)
        return ElementwiseUpdate(y, self._to_links(log_dh),
                                 None if dlog is None else self._to_links(dlog))

    def _restore(self, y: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """The links x whose active plaquettes are ``u`` when those of ``y`` are v = h(u) (any
        representative mod 2π, on the active rows): the updated links move back by v − u."""
        return torch.where(self.active, mod_2pi(y - self._to_links(v - u)), y)


class PlaquetteCoupling(PlaquetteCouplingBase):
    """A plaquette coupling with NCP maps (:mod:`~latticeflow.flows.ncp`) of ``n_mixture``
    tan-transforms; the conditioner gives 2·n_mixture + 1 channels (log-scales, mixture logits,
    shift), and the score step's VJP is in closed form (module docstring)."""

    closed_form_vjp = True

    def __init__(self, lattice: tuple[int, int], mu: int, offset: int, n_mixture: int,
                 hidden: list[int], kernel_size: int, activation: str, loop_length: int = 2):
        super().__init__(lattice, mu, offset, 2 * n_mixture + 1, hidden, kernel_size, activation,
                         loop_length)
        self.n_mixture = n_mixture

    def condition(self, x: Tensor) -> PlaquetteConditioning:
        """NCP parameters on the active plaquette rows, with the conditioner's recorded values."""
        out, values = self._conditioner(x)
        k = self.n_mixture
        return PlaquetteConditioning(
            NCPParams(out[:, :k], torch.softmax(out[:, k:2 * k], dim=1), out[:, 2 * k]), values)

    def transform(self, x: Tensor, cond: PlaquetteConditioning, need_dlog: bool = False
                  ) -> ElementwiseUpdate:
        u = self._active_angles(x)
        h, dh, d2h = ncp(u, cond.ncp, need_second=need_dlog)
        return self._update(x, u, h, torch.log(dh), None if d2h is None else d2h / dh)

    def untransform(self, y: Tensor, cond: PlaquetteConditioning) -> tuple[Tensor, Tensor]:
        u, target, dh = ncp_inverse(self._active_angles(y), cond.ncp)
        return self._restore(y, u, target), self._to_links(torch.log(dh))

    def frozen_vjp(self, x: Tensor, cond: PlaquetteConditioning, score_active: Tensor
                   ) -> Tensor:
        p = cond.ncp
        score = score_active[:, self.mu].index_select(self.axis, self.link_rows)
        # y − x = h(u) − u on the updated links: the map's gradient is s (h' − 1) + h''/h'.
        grad_u, grad_log_scale, grad_weights, grad_shift = ncp_log_deriv_vjp(
            self._active_angles(x), p, score)
        grad_u = grad_u - score
        grad_logits = p.weights * (grad_weights - (p.weights * grad_weights).sum(1, keepdim=True))
        grad_out = torch.cat([grad_log_scale, grad_logits, grad_shift.unsqueeze(1)], dim=1)
        hidden = cond.values[-1]
        grad_hidden = self.net[-1].at_rows_input_vjp(grad_out, hidden.shape, self.axis + 1,
                                                     self.plaq_windows)
        grad_features = input_vjp(self.net[:-1], cond.values, grad_hidden)
        # Features (cos A, sin A) per angle A, masked alike:
        # ∂/∂A = −sin A ∂/∂cos A + cos A ∂/∂sin A.
        features = cond.values[0].unflatten(1, (-1, 2))
        grad_features = grad_features.unflatten(1, (-1, 2))
        grad_angles = (features[:, :, 0] * grad_features[:, :, 1]
                       - features[:, :, 1] * grad_features[:, :, 0])
        # Angle j is Σ_{k ≤ j} P rolled by k·shift: P gets Σ_k (Σ_{j ≥ k} grad_j) rolled back.
        tail = grad_angles[:, -1]
        grad_plaq = torch.roll(tail, -(self.loop_length - 1) * self.passive_shift, self.axis)
        for k in range(self.loop_length - 2, -1, -1):
            tail = tail + grad_angles[:, k]
            grad_plaq = grad_plaq + torch.roll(tail, -k * self.passive_shift, self.axis)
        grad_plaq = grad_plaq.index_add(self.axis, self.plaq_rows, grad_u)
        return plaquette_adjoint(grad_plaq)


@dataclass
class CircularSplineParams:
    """Knots of the circular splines on the active plaquette rows (each ``(batch, K + 1, ...)``)
    and their rotations ``shift`` (``(batch, ...)``)."""

    knots: Knots
    shift: Tensor


class PlaquetteSplineCoupling(PlaquetteCouplingBase):
    """A plaquette coupling with circular rational-quadratic splines of ``n_bins`` bins on
    [0, 2π) and a rotation (:func:`~latticeflow.flows.spline.circular_spline`).

    The conditioner gives 3·n_bins + 1 channels: raw widths, heights and knot slopes (K each;
    the slope at 2π is the one at 0) and the rotation. The inverse is analytic, and the score
    step's VJP on the frozen links is taken by autograd over the layer's graph (with
    ∂ log h'/∂u in closed form). A fresh coupling (zero last layer) is the identity.
    """

    def __init__(self, lattice: tuple[int, int], mu: int, offset: int, n_bins: int,
                 hidden: list[int], kernel_size: int, activation: str, loop_length: int = 2):
        super().__init__(lattice, mu, offset, 3 * n_bins + 1, hidden, kernel_size, activation,
                         loop_length)
        self.n_bins = n_bins

    def condition(self, x: Tensor) -> CircularSplineParams:
        """Spline knots and rotations on the active plaquette rows."""
        out, _ = self._conditioner(x)
        k = self.n_bins
        return CircularSplineParams(
            circular_knots(out[:, :k], out[:, k:2 * k], out[:, 2 * k:3 * k] + SLOPE_OFFSET),
            out[:, 3 * k])

    def transform(self, x: Tensor, cond: CircularSplineParams, need_dlog: bool = False
                  ) -> ElementwiseUpdate:
        u = self._active_angles(x)
        h, log_dh, dlog = circular_spline(u, cond.knots, cond.shift, need_dlog)
        return self._update(x, u, h, log_dh, dlog)

    def untransform(self, y: Tensor, cond: CircularSplineParams) -> tuple[Tensor, Tensor]:
        v = self._active_angles(y)
        u, log_dh = circular_spline_inverse(v, cond.knots, cond.shift)
        return self._restore(y, u, v), self._to_links(log_dh)


PRIORS = ("uniform", "plaquette")
#: Circle maps of the couplings (the ``[flow] transform`` key of the u1 flow).
TRANSFORMS = ("ncp", "spline")


def u1_equivariant(lattice: tuple[int, int], n_couplings: int = 16, n_mixture: int = 6,
                   hidden: Sequence[int] = (8, 8), kernel_size: int = 3,
                   activation: str = "leaky_relu", loop_length: int = 2,
                   prior: str = "plaquette", transform: str = "ncp", n_bins: int = 8,
                   beta: float | None = None) -> Flow:
    """Gauge-equivariant flow on a 2D lattice with extents divisible by 4.

    ``transform``: ``"ncp"`` (:class:`PlaquetteCoupling`, mixtures of ``n_mixture``
    tan-transforms) or ``"spline"`` (:class:`PlaquetteSplineCoupling`, circular splines of
    ``n_bins`` bins); the other map's size is unused.

    ``prior``: ``"uniform"`` (Haar: independent uniform links) or ``"plaquette"``
    (:class:`~latticeflow.flows.plaquette_prior.PlaquettePrior`, independent von Mises plaquettes
    of concentration ``beta``, the Wilson action's β; exact on an open lattice, so the couplings
    only learn what the periodic boundary changes). At ``beta = 0`` the plaquette prior is the
    uniform link density (its κ → 0 limit), so the uniform prior is used.

    Coupling k updates direction μ = k mod 2. The stripes of a direction are visited in the order
    that moves away from the passive plaquettes: an update changes its active plaquette row and,
    through the passive row, the row the previous coupling of that direction left alone. So
    offsets run −(k // 2) mod 4 for μ = 0 (passive row below) and (k // 2) mod 4 for μ = 1
    (passive row above). Equivariant under translations by 4 sites (by the mask period).
    """
    if len(lattice) != 2 or any(n % MASK_PERIOD for n in lattice):
        raise ValueError(f"the U(1) flow needs a 2D lattice with extents divisible by "
                         f"{MASK_PERIOD}, got {lattice}")
    hidden = list(hidden)
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if prior == "plaquette" and beta is None:
        raise ValueError("the plaquette prior needs the action's beta")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    base = (UniformAnglePrior((2, *lattice)) if prior == "uniform" or beta == 0
            else PlaquettePrior(tuple(lattice), beta))
    coupling, size = ((PlaquetteCoupling, n_mixture) if transform == "ncp"
                      else (PlaquetteSplineCoupling, n_bins))
    couplings = [
        coupling(tuple(lattice), k % 2, (k // 2 if k % 2 else -(k // 2)) % MASK_PERIOD, size,
                 hidden, kernel_size, activation, loop_length)
        for k in range(n_couplings)
    ]
    return Flow(base, couplings)
