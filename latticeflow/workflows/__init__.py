"""The workflow layer: train, sample, run HMC and analyse, with typed settings in and typed
results out. The command line (``latticeflow.commands``) and the Python API
(``latticeflow.api``) are thin faces over it.

A run directory (``latticeflow run``, ``latticeflow train``, ``latticeflow sample``) holds
``checkpoint.pt`` (:data:`~latticeflow.training.CHECKPOINT_NAME`), the neural-MCMC ensemble
:data:`ENSEMBLE_NAME` and the analysis in :data:`ANALYSIS_DIR`.
"""

from __future__ import annotations

#: The neural-MCMC ensemble of a run directory.
ENSEMBLE_NAME = "nmcmc.h5"
#: The folder of a run directory that holds the analysis of its ensemble.
ANALYSIS_DIR = "analysis"

__all__ = ["ANALYSIS_DIR", "ENSEMBLE_NAME"]
