"""Analysing an ensemble into files: :func:`analyse_run` (the observables with Γ-method
errors, :func:`latticeflow.measure.analyse`, as a text report, a JSON record and plots)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latticeflow.ensemble import Ensemble
    from latticeflow.measure import AnalysisResult


@dataclass(frozen=True)
class AnalyseSettings:
    """What to analyse and where it goes: drop the first ``thermalization`` rows of every
    chain; ``report``: write the text report there; ``plots``: write the standard plots into
    that folder (``autocorrelation``: also Γ(t) and τ_int(W)); ``record``: write the JSON
    record there (last, so that a record means a complete analysis), with ``record_extra``
    keys added. ``show`` receives the text report as soon as it is ready."""

    thermalization: int = 0
    wilson_max: int | None = None
    report: Path | None = None
    plots: Path | None = None
    autocorrelation: bool = False
    record: Path | None = None
    record_extra: Mapping[str, Any] = field(default_factory=dict)
    show: Callable[[str], None] | None = None


@dataclass(frozen=True)
class AnalyseRun:
    """The analysis, its text report and the plot files written."""

    result: AnalysisResult
    report: str
    plots: list[Path]


def analyse_run(ensemble: str | os.PathLike | Ensemble, settings: AnalyseSettings
                ) -> AnalyseRun:
    """Analyse ``ensemble`` (a file or one in memory); see :class:`AnalyseSettings`."""
    from latticeflow import measure, script_support  # slow imports, needed only here
    from latticeflow.measure import plots

    s = settings
    result = measure.analyse(ensemble, s.thermalization, wilson_max=s.wilson_max)
    report = script_support.observables_report(result)
    if s.report is not None:
        s.report.parent.mkdir(parents=True, exist_ok=True)
        s.report.write_text(report + "\n")
    if s.show is not None:
        s.show(report)
    written = ([] if s.plots is None else
               plots.standard_plots(result, s.plots, autocorrelation=s.autocorrelation))
    if s.record is not None:
        script_support.write_json(s.record, {**measure.observables_record(result),
                                             **s.record_extra})
    return AnalyseRun(result, report, written)


__all__ = ["AnalyseRun", "AnalyseSettings", "analyse_run"]
