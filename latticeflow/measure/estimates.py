"""Estimates shared by the per-theory measurements and the driver: Γ-method estimates of one
observable over chains (:func:`gamma_observable`, ShortChainWarnings collected, not raised) and
jackknife errors of functions of micro-bin means (:func:`_jackknife_errors`), plus the helpers
that turn per-batch torch series into the numpy replicas they take (:func:`_copies`,
:func:`_stack`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor

from latticeflow.measure.results import ObservableResult
from latticeflow.statistics import ShortChainWarning, gamma_method, jackknife

log = logging.getLogger(__name__)


def _with_short_chain_warnings(compute: Callable[[], Any]) -> tuple[Any, tuple[str, ...]]:
    """Run ``compute`` and return its result and the messages of ShortChainWarnings it raised
    (other warnings are passed on)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with np.errstate(all="ignore"):
            result = compute()
    messages = []
    for w in caught:
        if issubclass(w.category, ShortChainWarning):
            messages.append(str(w.message))
        elif not issubclass(w.category, RuntimeWarning):
            warnings.warn(w.message, w.category, stacklevel=2)
    return result, tuple(dict.fromkeys(messages))


def gamma_observable(name: str, replicas: list[np.ndarray],
                     derived: Callable[[np.ndarray], float] | None = None) -> ObservableResult:
    """Γ-method estimate of one observable over chains (replicas) ``(N_c,)`` or ``(N_c, k)``.

    ShortChainWarnings are collected into ``warnings`` and logged, not raised.
    """
    result, messages = _with_short_chain_warnings(lambda: gamma_method(replicas, derived))
    for message in messages:
        log.warning("%s: %s", name, message)
    return ObservableResult(name, result.value, result.error, result.tau_int,
                            result.tau_int_error, result, messages)


def _jackknife_errors(f: Callable[[np.ndarray], np.ndarray], micro: np.ndarray, n_bins: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """f of the mean of all micro-bins (no bias correction, like the Γ-method values) and its
    jackknife error over ``n_bins`` bins of micro-bins (NaN with fewer than 2 bins)."""
    with np.errstate(all="ignore"):
        value = np.asarray(f(micro.mean(axis=0)), dtype=float)
        if n_bins < 2:
            return value, np.full_like(value, np.nan)
        _, error = jackknife(f, micro, n_bins)
    return value, np.asarray(error, dtype=float)


def _copies(series: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Own numpy copies: a view (e.g. one momentum of the power spectrum) would keep the whole
    per-chunk tensor alive for the rest of the analysis."""
    return {name: np.array(values.numpy(), copy=True) for name, values in series.items()}


def _stack(*columns: list[np.ndarray]) -> list[np.ndarray]:
    """Per-chain ``(N_c, k)`` arrays from k lists of per-chain series."""
    return [np.column_stack(parts) for parts in zip(*columns, strict=True)]
