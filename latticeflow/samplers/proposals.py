"""Diagnostics of the flow's proposals in neural MCMC, over all proposals of a run.

The chain rows of an NMCMC ensemble are (repeated) states distributed as p, not draws of q, so
importance-sampling diagnostics computed over them are biased. The sampler therefore keeps
running statistics of the log weights log w = −S − log q of *every* proposal it uses (the chain
states and the rejected ones alike, across resumes) and the ensemble file stores their summary
as root attributes (:data:`~latticeflow.ensemble.proposals.ATTRIBUTES`, read back by
:func:`~latticeflow.ensemble.proposals.read_proposal_summary`; a joined file of shards, from
``torchrun ... sample``, carries those of all the shards' proposals together):

* ``proposals``: proposals used; ``nonfinite_proposals``: those with a non-finite log weight
  (S or log q infinite or NaN), which are never accepted;
* ``proposal_ess``: the normalised ESS (Σw)²/(N Σw²) ∈ (0, 1] over the N finite proposals
  (NaN when there are none), as :func:`latticeflow.statistics.ess`;
* ``proposal_pareto_k``: the Pareto tail index k̂ of those weights
  (:func:`latticeflow.statistics.pareto_k`; NaN when undefined). The running state keeps
  the ``TAIL_CAPACITY`` largest log weights, so for N > ~466 000 the tail fit uses those
  2047 largest weights instead of 3√N.

The running state has a fixed size whatever the number of proposals (it is part of the
sampler's resume state). Log weights are folded into the sums in blocks of ``BLOCK`` proposals
counted from the first one of the run, whatever the sizes of the batches they arrive in (the
last, partial block waits in the state), so that a resumed run's summary equals an uninterrupted
run's bit for bit: float sums depend on how the terms are grouped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from latticeflow.ensemble.proposals import ProposalSummary
from latticeflow.statistics import pareto_k

TAIL_CAPACITY = 2048
BLOCK = 1024
_STATE_KEYS = ("count", "nonfinite", "shift", "sum_w", "sum_w2", "tail", "pending")


@dataclass
class ProposalStats:
    """Running statistics of proposal log weights (see the module docstring).

    The ESS comes from Σ exp(log w − shift) and Σ exp(2(log w − shift)) with ``shift`` the
    largest finite log w so far (the sums are rescaled when it grows: no overflow); ``tail``
    holds the ``TAIL_CAPACITY`` largest finite log weights in ascending order, padded with −inf.
    """

    count: int = 0
    nonfinite: int = 0
    shift: float = -math.inf
    sum_w: float = 0.0
    sum_w2: float = 0.0
    tail: np.ndarray = field(default_factory=lambda: np.full(TAIL_CAPACITY, -np.inf))
    pending: np.ndarray = field(default_factory=lambda: np.empty(0))

    def add(self, log_weight: np.ndarray) -> None:
        """Record the log weights of more proposals (any shape)."""
        lw = np.asarray(log_weight, dtype=np.float64).reshape(-1)
        self.count += lw.size
        self.nonfinite += int((~np.isfinite(lw)).sum())
        lw = np.concatenate([self.pending, lw])
        whole = lw.size - lw.size % BLOCK
        for start in range(0, whole, BLOCK):
            self._fold(lw[start:start + BLOCK])
        self.pending = lw[whole:]

    def _fold(self, log_weight: np.ndarray) -> None:
        """Add one block of log weights to the sums and the tail."""
        finite = log_weight[np.isfinite(log_weight)]
        if finite.size == 0:
            return
        shift = max(self.shift, float(finite.max()))
        scale = math.exp(self.shift - shift)
        self.sum_w = self.sum_w * scale + float(np.exp(finite - shift).sum())
        self.sum_w2 = self.sum_w2 * scale**2 + float(np.exp(2.0 * (finite - shift)).sum())
        self.shift = shift
        merged = np.concatenate([self.tail, finite])
        self.tail = np.sort(np.partition(merged, merged.size - TAIL_CAPACITY)[-TAIL_CAPACITY:])

    def folded(self) -> ProposalStats:
        """A copy with the pending partial block folded in."""
        copy = ProposalStats(self.count, self.nonfinite, self.shift, self.sum_w, self.sum_w2,
                             self.tail.copy())
        copy._fold(self.pending)
        return copy

    @classmethod
    def combined(cls, parts: Sequence[ProposalStats]) -> ProposalStats:
        """The statistics of all proposals of ``parts`` together (e.g. the shards of a run)."""
        parts = [p.folded() for p in parts]
        shift = max(p.shift for p in parts)
        scales = [math.exp(p.shift - shift) if p.n_finite else 0.0 for p in parts]
        merged = np.concatenate([p.tail for p in parts])
        return cls(sum(p.count for p in parts), sum(p.nonfinite for p in parts), shift,
                   sum(p.sum_w * a for p, a in zip(parts, scales, strict=True)),
                   sum(p.sum_w2 * a**2 for p, a in zip(parts, scales, strict=True)),
                   np.sort(merged)[-TAIL_CAPACITY:])

    @property
    def n_finite(self) -> int:
        return self.count - self.nonfinite

    def summary(self) -> ProposalSummary:
        if self.pending.size:
            return self.folded().summary()
        n = self.n_finite
        ess = self.sum_w**2 / (n * self.sum_w2) if n else math.nan
        k = pareto_k(self.tail[np.isfinite(self.tail)], size=n) if n else None
        return ProposalSummary(self.count, self.nonfinite, ess, k)

    def state_dict(self, prefix: str) -> dict[str, np.ndarray]:
        """The state as fixed-size arrays, keys prefixed with ``prefix``."""
        pending = np.full(BLOCK, np.nan)   # fixed size: the first count % BLOCK entries count
        pending[:self.pending.size] = self.pending
        values = (np.int64(self.count), np.int64(self.nonfinite), np.float64(self.shift),
                  np.float64(self.sum_w), np.float64(self.sum_w2), self.tail.copy(), pending)
        return {prefix + key: np.asarray(v) for key, v in zip(_STATE_KEYS, values, strict=True)}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], prefix: str) -> ProposalStats:
        """The inverse of :meth:`state_dict`; empty statistics when ``state`` has none (a
        resume state written before they were kept)."""
        if prefix + "count" not in state:
            return cls()
        get = {key: np.asarray(state[prefix + key]) for key in _STATE_KEYS if prefix + key in state}
        count = int(get["count"])
        # States written before blocks were kept have folded every proposal already.
        pending = (get["pending"][:count % BLOCK].astype(np.float64) if "pending" in get
                   else np.empty(0))
        return cls(count, int(get["nonfinite"]), float(get["shift"]), float(get["sum_w"]),
                   float(get["sum_w2"]), get["tail"].astype(np.float64), pending)
