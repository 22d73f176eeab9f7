"""latticeflow: normalizing-flow samplers for lattice field theories.

``import latticeflow as lf`` gives the Python API (docs/python-api.md): ``lf.load_action``,
``lf.train``, ``lf.load_flow``, ``lf.nmcmc``, ``lf.hmc``, ``lf.analyse``, ``lf.to_pyerrors``, ...
The names are imported on first use (PEP 562), so that ``import latticeflow`` stays cheap for the
command line.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name → the module that defines it
_EXPORTS = {
    **dict.fromkeys(("AnalysisResult", "Ensemble", "FlowSamples", "ObservableResult",
                     "TrainedFlow", "analyse", "hmc", "load_action", "load_flow", "load_recipe",
                     "nmcmc", "read_ensemble", "train"), "latticeflow.api"),
    "gamma_method": "latticeflow.statistics",
    "LatticeflowError": "latticeflow.base.errors",
    "to_pyerrors": "latticeflow.measure.pyerrors_export",
}
#: public submodules
_MODULES = ("observables",)

__all__ = sorted([*_EXPORTS, *_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"latticeflow.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'latticeflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
