"""A vectorised bracketed root finder for monotone increasing elementwise maps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def default_tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance on the root: a few ulps of 2π in the working precision."""
    return 16 * torch.finfo(dtype).eps * 2 * torch.pi


@torch.no_grad()
def solve_increasing(
    f: Callable[[Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    lo: Tensor | float,
    hi: Tensor | float,
    tol: float | None = None,
    max_iter: int = 100,
) -> Tensor:
    """Solve f(u) = target for u ∈ [lo, hi], elementwise, with f increasing.

    ``f(u)`` returns ``(value, derivative)``. Safeguarded Newton: a Newton step is taken when it
    lands strictly inside the current bracket, otherwise the bracket is bisected; the bracket
    shrinks on every iteration, so the method cannot diverge. Iterates until every Newton step or
    bracket width is below ``tol`` (default :func:`default_tolerance`). The result is detached:
    differentiate through it with the implicit-function step in the caller, never through the
    iterations.
    """
    tol = default_tolerance(target.dtype) if tol is None else tol
    lo = torch.as_tensor(lo, dtype=target.dtype, device=target.device).expand_as(target).clone()
    hi = torch.as_tensor(hi, dtype=target.dtype, device=target.device).expand_as(target).clone()
    u = 0.5 * (lo + hi)
    for _ in range(max_iter):
        value, deriv = f(u)
        residual = value - target
        below = residual < 0
        lo = torch.where(below, u, lo)
        hi = torch.where(below, hi, u)
        newton = u - residual / deriv
        inside = (newton >= lo) & (newton <= hi)
        new_u = torch.where(inside, newton, 0.5 * (lo + hi))
        step = (new_u - u).abs()
        u = new_u
        if bool(((step < tol) | (hi - lo < tol)).all()):
            break
    return u
