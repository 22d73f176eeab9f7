"""Draws from a flow and their importance weights: the one :class:`FlowSamples` type and the
one log-weight formula, log w = −S − log q.

With x ~ q and w = e^{−S(x)}/q(x), E_q[w] = Z; every log weight in latticeflow (the Python
API's samples, thermodynamics, the estimator study, the sampler's proposal statistics) is
:func:`log_weight` of an action and a log density.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latticeflow.statistics import ess


def log_weight(action: Any, log_q: Any) -> Any:
    """log w = −S − log q, elementwise, for arrays or tensors of the same shape."""
    return -action - log_q


@dataclass(frozen=True)
class FlowSamples:
    """N independent draws x ~ q of a flow: ``log_q`` and ``action`` ``(N,)`` in float64
    (tensors on the flow's device, or numpy arrays), ``x`` ``(N, *field_shape)`` when the
    configurations were kept (None otherwise), and ``measurements[name]`` ``(N,)`` for any
    per-draw measurement recorded alongside (an observable, another parameter point's action).
    """

    x: Tensor | None
    log_q: Tensor | np.ndarray
    action: Tensor | np.ndarray
    measurements: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def log_weight(self) -> Tensor | np.ndarray:
        """log w = −S − log q ``(N,)`` (the importance weight up to log Z)."""
        return log_weight(self.action, self.log_q)

    @property
    def ess(self) -> float:
        """Normalised effective sample size (Σw)²/(N Σw²) ∈ (0, 1]."""
        lw = self.log_weight
        return ess(lw.cpu().numpy() if isinstance(lw, Tensor) else lw)

    def __len__(self) -> int:
        return len(self.log_q)

    def __iter__(self) -> Iterator[Any]:
        """``x, log_q, action = samples``."""
        return iter((self.x, self.log_q, self.action))


@torch.no_grad()
def fresh_ess(flow: Any, action: Callable[[Tensor], Tensor], n: int, batch: int,
              generator: torch.Generator | None = None) -> tuple[float, float]:
    """(ESS, seconds) of ``n`` fresh independent draws of ``flow`` (a
    :class:`~latticeflow.flows.Flow`) against ``action``, drawn in batches of ``batch``."""
    log_w, started = [], time.perf_counter()
    for start in range(0, n, batch):
        x, log_q = flow.sample(min(batch, n - start), generator=generator)
        log_w.append(log_weight(action(x).double(), log_q.double()).cpu().numpy())
    return ess(np.concatenate(log_w)), time.perf_counter() - started


__all__ = ["FlowSamples", "fresh_ess", "log_weight"]
