"""The analysis of HDF5 ensembles: the standard observables with Γ-method errors, correlators,
topology, Wilson loops, exact reference values and side-by-side comparisons.

What lives where
----------------
* :mod:`~latticeflow.measure.results`: the result types (:class:`ObservableResult`,
  :class:`CorrelatorResult`, :class:`WilsonResult`, :class:`TopologyResult`,
  :class:`ExactReference`, :class:`AnalysisResult`) and the JSON record of an analysis;
* :mod:`~latticeflow.measure.rows`: the rows analysed (:func:`open_rows`), their split into
  chains (:func:`chain_layout`), chunks and micro-bins (:class:`MicroBins`), jackknife bins;
  the conventions on chains, thermalization and memory are stated there;
* :mod:`~latticeflow.measure.phi4`, :mod:`~latticeflow.measure.u1`: what is measured per
  theory, with the definitions of every observable (:func:`wilson_loops` in ``u1``);
* :mod:`~latticeflow.measure.estimates`: Γ-method and jackknife estimates of measured series;
* :mod:`~latticeflow.measure.exact_reference`: exact values where they are known;
* :mod:`~latticeflow.measure.compare`: :func:`deviation`, :class:`Comparison`, :func:`compare`;
* :mod:`~latticeflow.measure.analyse`: the driver :func:`analyse` with its file checks and
  sampler diagnostics;
* :mod:`~latticeflow.measure.plots` (the figures of an analysis, matplotlib) and
  :mod:`~latticeflow.measure.pyerrors_export` (:func:`to_pyerrors`): imported on their own, not
  by this package (``import latticeflow.measure`` does not load matplotlib).
"""

from latticeflow.measure.analyse import PARETO_K_HEAVY, analyse
from latticeflow.measure.compare import Comparison, compare, deviation
from latticeflow.measure.estimates import gamma_observable
from latticeflow.measure.exact_reference import exact_reference
from latticeflow.measure.phi4 import PHI4_OBSERVABLES
from latticeflow.measure.results import (
    HISTORY_LABELS,
    AnalysisResult,
    CorrelatorResult,
    ExactReference,
    ObservableResult,
    TopologyResult,
    WilsonResult,
    observables_record,
)
from latticeflow.measure.rows import (
    ChainLayout,
    MicroBins,
    RowSource,
    chain_layout,
    jackknife_bins,
    open_rows,
)
from latticeflow.measure.u1 import U1_OBSERVABLES, wilson_loops

__all__ = [
    "HISTORY_LABELS", "PARETO_K_HEAVY", "PHI4_OBSERVABLES", "U1_OBSERVABLES", "AnalysisResult",
    "ChainLayout", "Comparison", "CorrelatorResult", "ExactReference", "MicroBins",
    "ObservableResult", "RowSource", "TopologyResult", "WilsonResult", "analyse", "chain_layout",
    "compare", "deviation", "exact_reference", "gamma_observable", "jackknife_bins",
    "observables_record", "open_rows", "wilson_loops",
]
