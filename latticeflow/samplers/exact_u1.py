"""Exact, independent samples of pure 2D U(1) Wilson gauge theory on a periodic L0 × L1 torus.

Conventions as in :mod:`latticeflow.lattice`: links ``(n, 2, L0, L1)`` in [0, 2π),
P(x) = θ₀(x) + θ₁(x+0̂) − θ₀(x+1̂) − θ₁(x), target density ∝ e^{−S} = Π_x e^{β cos P(x)} with
respect to dθ on the 2V links (V = L0·L1).

Derivation
----------
The map from links to (the plaquettes P(x) of all sites but x* = (L0−1, L1−1), the Polyakov loops
H₀, H₁, the gauge function α modulo a constant) is an isomorphism of tori with a unimodular
Jacobian (see :mod:`latticeflow.flows.plaquette_prior`); the last plaquette is fixed by
Σ_x P(x) ≡ 0 (mod 2π), P(x*) = −Σ_{x≠x*} P(x). The target density in these coordinates is
therefore uniform in H and α and, for the free plaquettes,

    p(P) ∝ Π_{x≠x*} e^{β cos P(x)} · e^{β cos P(x*)}.

Propose the V − 1 free plaquettes independently from von Mises(β), density
q(P) = Π_{x≠x*} e^{β cos P(x)} / (2π I₀(β)). Then p/q ∝ e^{β cos P(x*)} ≤ e^{β}, so accepting a
proposal with probability e^{β(cos P(x*) − 1)} gives exact samples of p (rejection sampling).
The links are then built in the comb gauge with uniform holonomies
(:func:`~latticeflow.flows.plaquette_prior.comb_gauge_links`) and carried by a uniformly random
gauge transformation, which is uniform on the fibre.

Acceptance rate: with Z = Σ_n I_n(β)^V (Haar measure, :func:`latticeflow.exact.u1_log_z`),

    a = E_q[e^{β(cos P(x*) − 1)}] = e^{−β} Z / I₀(β)^{V−1} = e^{−β} I₀(β) Σ_n (I_n/I₀)^V,

which tends to e^{−β} I₀(β) ≈ 1/√(2πβ) at large V: 0.47 at β = 1, 0.24 at β = 3, 0.17 at β = 6,
independent of the volume. Rejected rows are redrawn, so the cost per sample is 1/a proposals.
"""

from __future__ import annotations

import math

import torch
from scipy import special
from torch import Tensor

from latticeflow.exact import u1_log_z
from latticeflow.flows.plaquette_prior import comb_gauge_links, von_mises
from latticeflow.lattice import gauge_transform, mod_2pi


def expected_acceptance(beta: float, lattice: tuple[int, int]) -> float:
    """The acceptance rate a = e^{−β} Z / I₀(β)^{V−1} of :func:`sample_exact_u1` (module doc)."""
    volume = math.prod(lattice)
    log_i0 = math.log(special.ive(0, beta)) + beta
    return math.exp(u1_log_z(beta, tuple(lattice)) - beta - (volume - 1) * log_i0)


def sample_exact_u1(beta: float, lattice: tuple[int, int], n: int, *,
                    generator: torch.Generator | None = None, device=None,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` independent link fields ``(n, 2, L0, L1)`` in [0, 2π), exactly ∝ e^{β Σ cos P}.

    Rejection sampling from independent von Mises plaquettes (module doc), vectorised: each round
    redraws the rejected rows. Computed in float64, returned in ``dtype``.
    """
    if len(lattice) != 2:
        raise ValueError(f"the exact U(1) sampler needs a 2D lattice, got {lattice}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    l0, l1 = lattice
    volume = l0 * l1
    # The last plaquette (L0−1, L1−1) is fixed by the constraint; comb_gauge_links does not read it.
    plaq = torch.zeros((n, volume), dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        free = von_mises(beta, (todo.numel(), volume - 1), device=device, dtype=torch.float64,
                         generator=generator)
        last = -free.sum(1)
        u = torch.rand(todo.numel(), dtype=torch.float64, device=device, generator=generator)
        accept = u < torch.exp(beta * (torch.cos(last) - 1))
        plaq[todo[accept], :-1] = free[accept]
        todo = todo[~accept]
    uniform = 2 * math.pi * torch.rand((n, 2 + volume), dtype=torch.float64, device=device,
                                       generator=generator)
    links = comb_gauge_links(plaq.view(n, l0, l1), uniform[:, :2])
    links = gauge_transform(links, uniform[:, 2:].view(n, l0, l1))
    return mod_2pi(links.to(dtype))


__all__ = ["expected_acceptance", "sample_exact_u1"]
