"""A flow averaged over lattice symmetries: the mixture q_G(y) = (1/|G|) Σ_{g∈G} q(g⁻¹ y).

If the target p is invariant under measure-preserving maps g (lattice translations, φ → −φ)
but the trained density q is not, the mixture of the pushed-forward densities g♯q is a closer
proposal wherever q's error is not itself invariant. Sampling is exact and cheap: draw x ~ q
and a uniform g, and return y = g x; the density needs |G| − 1 more evaluations of q, each an
inverse pass of the flow, so a draw costs about |G| times a plain one. The ratio of the two
ESS measures how much of a trained flow's error is broken symmetry.

Conventions: fields are ``(batch, *field_shape)``; a :class:`LatticeSymmetry` shifts by
``shift`` sites (``torch.roll``, so g x (s) = x(s − shift)) and then negates if ``negate``.
Both are permutations up to sign, so |det g| = 1 and q(g⁻¹ y) is the density of g x at y.
For a flow with an even-site heat bath (:attr:`~latticeflow.flows.flow.Flow.heat_bath`) the
mixture is taken in the flow's own representation (odd sites and placeholder noise), so
every shift must map odd sites to odd sites (an even sum of its components); the even sites
are completed afterwards as in :meth:`~latticeflow.flows.flow.Flow.sample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from latticeflow.flows.flow import Flow


@dataclass(frozen=True)
class LatticeSymmetry:
    """g x = ±roll(x, shift) over the lattice axes (``negate``: the − sign)."""

    shift: tuple[int, ...]
    negate: bool = False

    def _apply(self, x: Tensor, sign: int) -> Tensor:
        y = torch.roll(x, tuple(sign * s for s in self.shift), tuple(range(1, x.dim())))
        return -y if self.negate else y

    def __call__(self, x: Tensor) -> Tensor:
        return self._apply(x, 1)

    def inverse(self, y: Tensor) -> Tensor:
        return self._apply(y, -1)  # negation and shifts commute


def diagonal_shifts(ndim: int, count: int, z2: bool = False) -> list[LatticeSymmetry]:
    """The shifts (k, k, …) for k = 0 … ``count`` − 1, each also negated when ``z2``."""
    if count < 1:
        raise ValueError(f"need at least one shift, got {count}")
    signs = (False, True) if z2 else (False,)
    return [LatticeSymmetry((k,) * ndim, negate) for k in range(count) for negate in signs]


class SymmetrizedFlow:
    """The mixture of ``flow``'s density over ``symmetries`` (which should include the
    identity for the mixture to contain q itself; any finite list gives a normalised density).
    :meth:`sample` has the signature and meaning of :meth:`Flow.sample`."""

    def __init__(self, flow: Flow, symmetries: Sequence[LatticeSymmetry]):
        if not symmetries:
            raise ValueError("SymmetrizedFlow needs at least one symmetry")
        ndim = len(flow.field_shape)
        for g in symmetries:
            if len(g.shift) != ndim:
                raise ValueError(f"shift {g.shift} does not match the lattice {flow.field_shape}")
            if flow.heat_bath is not None and sum(g.shift) % 2:
                raise ValueError(f"shift {g.shift} maps odd sites to even ones; a heat-bath "
                                 "flow needs shifts with an even sum of components")
        self.flow, self.symmetries = flow, list(symmetries)

    def log_prob(self, y: Tensor) -> Tensor:
        """log q_G(y) ``(batch,)`` in the flow's own representation."""
        parts = torch.stack([self.flow.log_prob(g.inverse(y)) for g in self.symmetries])
        return torch.logsumexp(parts, 0) - math.log(len(self.symmetries))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` draws y = g x (x ~ q, g uniform) and log q_G(y), the even sites completed by
        the heat bath when the flow has one (log q then includes their conditional)."""
        x, log_q = self.flow(self.flow.sample_prior(n, generator))
        which = torch.randint(len(self.symmetries), (n,), generator=generator,
                              device=x.device)
        drawn_with = [which == k for k in range(len(self.symmetries))]
        y = x.clone()
        for g, mine in zip(self.symmetries, drawn_with, strict=True):
            y[mine] = g(x[mine])
        parts = torch.empty((len(self.symmetries), n), dtype=log_q.dtype, device=log_q.device)
        for k, (g, mine) in enumerate(zip(self.symmetries, drawn_with, strict=True)):
            parts[k, mine] = log_q[mine]  # g⁻¹ y = x there: log q is known
            if (~mine).any():
                parts[k, ~mine] = self.flow.log_prob(g.inverse(y[~mine]))
        log_q_mix = torch.logsumexp(parts, 0) - math.log(len(self.symmetries))
        return self.flow.complete(y, log_q_mix, generator)


__all__ = ["LatticeSymmetry", "SymmetrizedFlow", "diagonal_shifts"]
