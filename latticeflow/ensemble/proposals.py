"""The proposal summary a neural-MCMC ensemble file records: root attributes written by the
sampler's running proposal statistics (:mod:`latticeflow.samplers.proposals`, which documents
them) and read back here, without the sampler or the flow.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from latticeflow.ensemble.reader import EnsembleReader

#: The root attributes: proposals used, non-finite ones, proposal ESS, Pareto k̂ (NaN: none).
ATTRIBUTES = ("proposals", "nonfinite_proposals", "proposal_ess", "proposal_pareto_k")


@dataclass(frozen=True)
class ProposalSummary:
    """What the file records about a run's proposals (see :mod:`latticeflow.samplers.proposals`)."""

    proposals: int
    nonfinite: int
    ess: float
    pareto_k: float | None

    def attributes(self) -> dict[str, int | float]:
        """The file's root attributes (k̂ = NaN when undefined)."""
        k = math.nan if self.pareto_k is None else self.pareto_k
        return dict(zip(ATTRIBUTES, (np.int64(self.proposals), np.int64(self.nonfinite),
                                     float(self.ess), float(k)), strict=True))

    def describe(self) -> str:
        """One line: ``proposal ESS 0.135, Pareto k̂ 0.42, 0 non-finite of 12000 proposals``."""
        k = "n/a" if self.pareto_k is None else f"{self.pareto_k:.2f}"
        return (f"proposal ESS {self.ess:.3f}, Pareto k̂ {k}, {self.nonfinite} non-finite of "
                f"{self.proposals} proposals")


def read_proposal_summary(path: str | os.PathLike) -> ProposalSummary | None:
    """The proposal attributes of an ensemble file; None when it has none (an HMC file or a
    file written before they were recorded). Reads a file that is being written too (through
    :class:`~latticeflow.ensemble.EnsembleReader`)."""
    with EnsembleReader(path) as reader:
        if not all(name in reader.attrs for name in ATTRIBUTES):
            return None
        proposals, nonfinite, ess, k = (reader.attrs[name] for name in ATTRIBUTES)
    k = float(k)
    return ProposalSummary(int(proposals), int(nonfinite), float(ess),
                           None if math.isnan(k) else k)


__all__ = ["ATTRIBUTES", "ProposalSummary", "read_proposal_summary"]
