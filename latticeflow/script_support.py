"""Shared plumbing of the analysis scripts (``analysis/*.py``): parsers with examples, one-line
errors with exit code 2, JSON output and plain-text tables.

Exit codes (as for the ``latticeflow`` command): 0 success; 2 bad input (missing, foreign or
truncated ensemble, impossible option, unwritable output); 130 interrupted. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from latticeflow.base.console import install_stderr_handler, one_line
from latticeflow.base.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, LatticeflowError
from latticeflow.measure import AnalysisResult, Comparison, ObservableResult, deviation


def script_parser(prog: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """An argparse parser whose ``--help`` ends with the example command lines, plus the
    ``-q``/``-v`` verbosity options."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug output")
    return parser


def add_thermalization(parser: argparse.ArgumentParser) -> None:
    """``--thermalization K`` (``-K``): rows dropped at the start of every chain."""
    parser.add_argument("-K", "--thermalization", type=int, default=0, metavar="K",
                        help="drop the first K rows of every chain (default 0)")


def run_script(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
               argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, set up logging to stderr and run ``body(args)``; returns the exit code.

    :class:`LatticeflowError` and :class:`OSError` (files) become one line
    ``PROG: error: MESSAGE`` on stderr and exit code 2; Ctrl-C gives 130.
    """
    args = parser.parse_args(argv)
    level = (logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.WARNING)
    install_stderr_handler(f"{parser.prog}: %(levelname)s: %(message)s")
    logging.getLogger().setLevel(level)
    try:
        return int(body(args) or EXIT_OK)
    except (LatticeflowError, OSError) as exc:
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create the output directory ``path`` (and parents); LatticeflowError if impossible."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LatticeflowError(f"{directory}: cannot create output directory: "
                               f"{exc.strerror or exc}") from None
    return directory


def json_safe(value: Any) -> Any:
    """Recursively convert numpy scalars/arrays to Python types and non-finite floats to None
    (strict JSON has no NaN or Infinity)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented strict JSON (see :func:`json_safe`)."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)
    try:
        Path(path).write_text(text + "\n")
    except OSError as exc:
        raise LatticeflowError(f"{path}: cannot write JSON: {exc.strerror or exc}") from None


def format_value(value: float, error: float | None = None, digits: int = 2) -> str:
    """``value ± error`` with the error to ``digits`` significant digits and the value to the
    same decimal place (``1.2346 ± 0.0012``); only the value (6 significant digits) when the
    error is None, infinite or zero, ``value ± nan`` (4 digits) when it is NaN. Very large or
    small magnitudes use exponent notation."""
    if value is None or not math.isfinite(value):
        return "nan" if value is None or math.isnan(value) else f"{value}"
    if error is not None and math.isnan(error):
        return f"{value:.4g} ± nan"
    if error is None or not math.isfinite(error) or error <= 0.0:
        return f"{value:.6g}"
    exponent = math.floor(math.log10(error)) - digits + 1
    scale = max(abs(value), error)
    if scale >= 1e6 or scale < 1e-4:
        power = math.floor(math.log10(scale))
        decimals = max(0, power - exponent)
        mantissa, err = value / 10**power, error / 10**power
        return f"({mantissa:.{decimals}f} ± {err:.{decimals}f})e{power:+d}"
    decimals = max(0, -exponent)
    return f"{value:.{decimals}f} ± {error:.{decimals}f}"


def format_deviation(dev: float) -> str:
    """A deviation in units of the combined error, e.g. ``+1.3σ``; empty for NaN."""
    if dev is None or math.isnan(dev):
        return ""
    return f"{dev:+.1f}σ"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text table with a rule under the header."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reports (the scripts' terminal tables)
# --------------------------------------------------------------------------------------------

_SHORT = "*"
_SHORT_NOTE = f"{_SHORT} Γ-method warning (chain short compared with τ_int): error unreliable"


def parse_int_list(text: str, n: int, what: str) -> list[int]:
    """``"K"`` → n copies of K; ``"K1,K2,..."`` → exactly n integers; LatticeflowError else."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise LatticeflowError(f"{what}: expected an integer or a comma-separated list of "
                               f"integers, got {text!r}") from None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise LatticeflowError(f"{what}: {len(values)} values given for {n} ensembles")
    return values


_DIAGNOSTIC_LABELS = {"exp_minus_delta_H": "<exp(-ΔH)>", "proposal_ess": "proposal ESS",
                      "pareto_k": "Pareto k̂", "nonfinite_proposals": "non-finite proposals"}


def ensemble_header(result: AnalysisResult) -> str:
    """The lines describing an analysed ensemble (file, theory, rows, acceptance, checks)."""
    lattice = "×".join(str(n) for n in result.lattice)
    params = ", ".join(f"{k} {v:g}" if isinstance(v, int | float) else f"{k} {v}"
                       for k, v in result.action_params.items() if k != "theory")
    chains = (f"{result.n_chains} chains × {min(result.chain_lengths)}"
              + (f"–{max(result.chain_lengths)}" if len(set(result.chain_lengths)) > 1 else "")
              + " rows" if result.n_chains > 1 else f"{result.n_total} rows")
    checks = [f"acceptance {result.acceptance:.4f}"]
    for name, estimate in result.diagnostics.items():
        label = _DIAGNOSTIC_LABELS.get(name, name)
        error = estimate.error if math.isfinite(estimate.error) else None  # none: show none
        checks.append(f"{label} {format_value(estimate.value, error, 2)}")
    lines = [
        f"ensemble    {result.path}",
        f"theory      {result.theory} ({params}) on {lattice}",
        f"sampler     {result.sampler}; {chains}, thermalization {result.thermalization}"
        f"{' per chain' if result.n_chains > 1 else ''} dropped -> N = {result.n} analysed",
        f"checks      {', '.join(checks)}",
    ]
    if result.exact.description:
        lines.append(f"exact       {result.exact.description}")
    return "\n".join(lines)


def _observable_row(o: ObservableResult, exact: float | None) -> list[str]:
    flag = _SHORT if o.warnings else ""
    row = [o.name + flag, format_value(o.value, o.error), format_value(o.tau_int, o.tau_int_error)]
    if exact is None:
        return row + ["", ""]
    return row + [f"{exact:.6g}", format_deviation(deviation(o.value, o.error, exact))]


def observables_report(result: AnalysisResult) -> str:
    """Terminal report of ``analysis/observables.py``: header, the observable table (value ±
    error, τ_int ± error, exact value and deviation where known), and the correlator / Wilson
    loop / topology summaries."""
    exact = result.exact
    rows = [_observable_row(o, exact.scalars.get(name))
            for name, o in result.observables.items()]
    parts = [ensemble_header(result), "",
             format_table(["observable", "value", "tau_int", "exact", "deviation"], rows)]
    short = any(o.warnings for o in result.observables.values())
    if result.correlators is not None:
        corr = result.correlators
        short |= bool(corr.xi2.warnings)
        parts += ["", f"correlators (errors: jackknife, {corr.n_bins} bins of {corr.bin_rows} "
                      f"rows; ξ₂: Γ-method)",
                  format_table(["observable", "value", "tau_int", "exact", "deviation"],
                               [_observable_row(corr.xi2, exact.xi2)]),
                  "", _correlator_table(result)]
    if result.topology is not None:
        topo = result.topology
        parts += ["", f"topological charge: Q in [{topo.charges.min()}, {topo.charges.max()}], "
                      f"max |Q - round(Q)| = {topo.max_non_integrality:.2g}"]
    if result.wilson is not None:
        parts += ["", _wilson_table(result)]
    if short:
        parts += ["", _SHORT_NOTE]
    return "\n".join(parts)


def _correlator_table(result: AnalysisResult) -> str:
    corr, exact = result.correlators, result.exact
    half = len(corr.c) // 2
    rows = []
    for t in range(half + 1):
        m_eff = (format_value(corr.m_eff[t - 1], corr.m_eff_error[t - 1])
                 if 1 <= t <= len(corr.m_eff) else "")
        row = [str(t), format_value(corr.c[t], corr.c_error[t]), m_eff]
        if exact.c is not None:
            row[2:2] = [f"{exact.c[t]:.6g}"]
            row.append(f"{exact.m_eff:.6g}" if m_eff else "")
        rows.append(row)
    headers = ["t", "C(t)", "m_eff(t)"] if exact.c is None else \
        ["t", "C(t)", "exact C(t)", "m_eff(t)", "exact m_eff"]
    return format_table(headers, rows)


def _wilson_table(result: AnalysisResult) -> str:
    wilson, exact = result.wilson, result.exact
    rows = []
    for k in range(1, min(wilson.rmax, wilson.tmax) + 1):
        row = [f"{k}x{k}", format_value(wilson.w[k - 1, k - 1], wilson.w_error[k - 1, k - 1]),
               format_value(wilson.creutz[k - 1, k - 1], wilson.creutz_error[k - 1, k - 1])]
        if exact.wilson is not None:
            row += [f"{exact.wilson[k - 1, k - 1]:.6g}", f"{exact.creutz[k - 1, k - 1]:.6g}"]
        rows.append(row)
    headers = ["R x T", "W(R,T)", "Creutz χ(R,T)"]
    if exact.wilson is not None:
        headers += ["exact W", "exact χ"]
    title = (f"Wilson loops, R = T (full {wilson.rmax}x{wilson.tmax} table in the plot; "
             f"jackknife, {wilson.n_bins} bins of {wilson.bin_rows} rows)")
    return title + "\n" + format_table(headers, rows)


def autocorrelation_record(result: AnalysisResult) -> dict[str, Any]:
    """JSON record of ``analysis/autocorrelation.py``: ``{"n", "sampler", "thermalization",
    "observables": {NAME: {"tau_int", "tau_int_error", "window"}}}``."""
    return {"n": result.n, "sampler": result.sampler, "thermalization": result.thermalization,
            "observables": {name: {"tau_int": o.tau_int, "tau_int_error": o.tau_int_error,
                                   "window": o.gamma.window}
                            for name, o in result.observables.items()}}


def autocorrelation_report(result: AnalysisResult, lags: int = 5) -> str:
    """Terminal report of ``analysis/autocorrelation.py``: τ_int ± error, window W, N/τ_int and
    the first ``lags`` values of ρ(t) per observable."""
    rows = []
    for o in result.observables.values():
        rho = o.gamma.rho
        rows.append([o.name + (_SHORT if o.warnings else ""),
                     format_value(o.tau_int, o.tau_int_error), str(o.gamma.window),
                     f"{result.n / o.tau_int:.0f}" if o.tau_int > 0 else "",
                     "  ".join(f"{rho[t]:+.3f}" if t < len(rho) else "" for t in
                               range(1, lags + 1))])
    headers = ["observable", "tau_int", "window W", "N/tau_int",
               "ρ(t), t = " + ", ".join(str(t) for t in range(1, lags + 1))]
    parts = [ensemble_header(result), "", format_table(headers, rows)]
    if any(o.warnings for o in result.observables.values()):
        parts += ["", _SHORT_NOTE]
    return "\n".join(parts)


def comparison_report(comparison: Comparison) -> str:
    """Terminal table of ``analysis/compare.py``: one row per observable, one column per
    ensemble (value ± error and, after the first, the deviation from the first in σ), and the
    exact value where known."""
    lines = [f"[{j}] {label}: {r.path} ({r.sampler}, N = {r.n}, acceptance "
             f"{r.acceptance:.3f})"
             for j, (label, r) in enumerate(zip(comparison.labels, comparison.results,
                                                strict=True))]
    headers = ["observable"] + [f"[{j}] {label}" for j, label in enumerate(comparison.labels)]
    has_exact = bool(comparison.exact)
    if has_exact:
        headers.append("exact")
    rows = []
    for i, name in enumerate(comparison.names):
        row = [name]
        for j in range(len(comparison.labels)):
            cell = format_value(comparison.values[i, j], comparison.errors[i, j])
            if j:
                cell += f" ({format_deviation(comparison.deviations[i, j])})"
            row.append(cell)
        if has_exact:
            value = comparison.exact.get(name)
            row.append("" if value is None else f"{value:.6g}")
        rows.append(row)
    note = "deviation (in parentheses): (value − value[0]) / sqrt(error² + error[0]²)"
    return "\n".join(lines + ["", format_table(headers, rows), "", note])
