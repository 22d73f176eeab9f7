"""Couplings on a blocked lattice: the multiscale layers of the φ⁴ flow.

A field x on a lattice of extents L_μ is split into its block means and the rest,

    c = D x   (the mean over blocks of b_μ = L_μ / C_μ sites: a field on the coarse lattice C)
    x = U c + d,   D d = 0,

with U the upsampling that repeats each coarse value over its block (D U = 1). A
:class:`BlockedLayers` maps c by a stack of ordinary layers on the coarse lattice (any layer of
:class:`~latticeflow.flows.flow.Flow`, in practice checkerboard spline couplings) and leaves d
alone: x' = x + U (g(c) − c). In the coordinates (c, d) its Jacobian is diag(∂g/∂c, 1), so

    log|det ∂x'/∂x| = log|det ∂g/∂c|.

The score recursion (DESIGN §4) passes through the blocking in closed form. The coarse score is
s_c = Uᵀ s (block sums: c enters x through U), the stack turns it into s'_c, and

    s' = s + Dᵀ (s'_c − s_c),   Dᵀ = U / (block volume),

as J⁻ᵀ(s − ∇ℓ) gives for J = 1 + U(∂g/∂c − 1)D; the inverse direction is the same with the
roles of x and x' swapped. No VJP is taken here: the stack's own layers take theirs.

On one checkerboard sublattice (``parity``; the flow models those sites alone, the others
are placeholders it leaves untouched) the same holds with c the mean over the block's sites of
that parity and U repeating c over them only: U' = P U, D' = U'ᵀ / (sites of the parity per
block), which needs blocks of an even number of sites.

On a line of constant physics the coarse lattice is named by its extents C, not by the block
size, so one coarse layer sees the same physical scale on every L and its weights move from L
to 2L as they are. A coarse lattice equal to the fine one (blocks of one site) is allowed.

Shapes: fields ``(batch, L0, L1, ...)``; coarse fields ``(batch, C0, C1, ...)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from latticeflow.lattice import checkerboard


def block_sizes(lattice: tuple[int, ...], coarse: tuple[int, ...]) -> tuple[int, ...]:
    """b_μ = L_μ / C_μ; raises ValueError unless every coarse extent divides its fine one."""
    if len(lattice) != len(coarse) or any(c < 1 or n % c for n, c in zip(lattice, coarse,
                                                                          strict=True)):
        raise ValueError(f"the coarse lattice {coarse} does not block the lattice {lattice} "
                         "(each coarse extent must divide the lattice extent)")
    return tuple(n // c for n, c in zip(lattice, coarse, strict=True))


class BlockedLayers(nn.Module):
    """A stack of layers acting on the block means of the field (module docstring).

    ``lattice``: the fine lattice; ``coarse``: the coarse lattice (same number of axes);
    ``layers``: layers built for the coarse lattice, applied in order; ``parity``: block
    only the sites of this checkerboard parity (module docstring).
    """

    def __init__(self, lattice: tuple[int, ...], coarse: tuple[int, ...],
                 layers: list[nn.Module], parity: int | None = None):
        super().__init__()
        self.lattice = tuple(lattice)
        self.blocks = block_sizes(self.lattice, tuple(coarse))
        self.coarse = tuple(coarse)
        self.volume = math.prod(self.blocks)
        self.layers = nn.ModuleList(layers)
        self.sites = self.volume
        if parity is not None:
            if self.volume % 2:
                raise ValueError(f"blocks of {self.blocks} sites hold unequal numbers of sites of "
                                 "each parity; a sublattice level needs an even block volume")
            self.sites = self.volume // 2
        mask = None if parity is None else checkerboard(self.lattice, parity)
        self.register_buffer("on_sublattice", mask, persistent=False)

    def _restrict(self, x: Tensor) -> Tensor:
        """P x: zero off the blocked sublattice (the identity without one)."""
        return x if self.on_sublattice is None else torch.where(self.on_sublattice, x, 0.0)

    def _split_shape(self, batch: int, block: bool = True) -> list[int]:
        """(batch, C0, b0, C1, b1, ...): each lattice axis as (coarse site, site in block);
        with ``block = False`` every b_μ is 1."""
        shape = [batch]
        for c, b in zip(self.coarse, self.blocks, strict=True):
            shape += [c, b if block else 1]
        return shape

    def block_sum(self, x: Tensor) -> Tensor:
        """Uᵀ x: the sum over each block, shape ``(batch, *coarse)``."""
        in_block = tuple(range(2, 2 * len(self.coarse) + 1, 2))
        return x.reshape(self._split_shape(x.shape[0])).sum(in_block)

    def upsample(self, c: Tensor) -> Tensor:
        """U c: each coarse value repeated over its block, shape ``(batch, *lattice)``."""
        batch = c.shape[0]
        repeated = c.reshape(self._split_shape(batch, block=False))
        return repeated.expand(self._split_shape(batch)).reshape(batch, *self.lattice)

    def _through_stack(self, x: Tensor, score: Tensor | None, inverse: bool
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
        """x + U(g(c) − c) with c = Dx and g the stack (run backwards with ``inverse``), its
        log-determinant, and with a ``score`` s the new score s + Dᵀ(s'_c − s_c), s_c = Uᵀs."""
        c = self.block_sum(self._restrict(x)) / self.sites
        mapped, total = c, c.new_zeros(c.shape[0])
        score_c = coarse_score = None if score is None else self.block_sum(self._restrict(score))
        for layer in (reversed(self.layers) if inverse else self.layers):
            if score is None:
                mapped, log_det = layer.inverse(mapped) if inverse else layer(mapped)
            else:
                step = layer.inverse_and_score if inverse else layer.forward_and_score
                mapped, log_det, coarse_score = step(mapped, coarse_score)
            total = total + log_det
        moved = x + self._restrict(self.upsample(mapped - c))
        if score is None:
            return moved, total, None
        step = self._restrict(self.upsample(coarse_score - score_c)) / self.sites
        return moved, total, score + step

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x' = x + U(g(Dx) − Dx) and log|det ∂x'/∂x|."""
        return self._through_stack(x, None, inverse=False)[:2]

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """x with forward(x) = y, and log|det ∂x/∂y|."""
        return self._through_stack(y, None, inverse=True)[:2]

    def forward_and_score(self, x: Tensor, score_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x', log|det J|, s_x'): the stack's score recursion on the coarse field."""
        return self._through_stack(x, score_x, inverse=False)

    def inverse_and_score(self, y: Tensor, score_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, log|det ∂x/∂y|, s_x): the stack run backwards on the coarse field."""
        return self._through_stack(y, score_y, inverse=True)


def with_coarse_levels(state: dict[str, Tensor], fresh: dict[str, Tensor], n_base_layers: int,
                       n_levels: int) -> dict[str, Tensor]:
    """The weights of a flow without coarse levels (``state``) moved into the same flow with
    ``n_levels`` coarse levels added (whose own fresh weights ``fresh`` are).

    The layers of a φ⁴ flow are ``couplings.<i>``: first ``n_base_layers`` base layers, then the
    coarse levels, then the couplings on the lattice itself; the latter move up by ``n_levels``.
    Fresh coarse levels are the identity, so the result is the same density as ``state``.
    """
    moved = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "couplings" and int(parts[1]) >= n_base_layers:
            parts[1] = str(int(parts[1]) + n_levels)
        moved[".".join(parts)] = value
    unknown = set(moved) - set(fresh)
    if unknown:
        raise ValueError(f"weights that the flow with coarse levels lacks: {sorted(unknown)[:3]}")
    return {**fresh, **moved}
