"""Studies that the analysis scripts run and report.

* ``freezing``: HMC against neural MCMC across β (topological freezing of 2D U(1)).
* ``thermodynamics``: log Z, bounds and reweighting from a trained flow.
* The estimator study (``analysis/estimator_study.py``): ``estimators`` (what it measures, its
  configuration and measurements), ``estimator_runs`` (the round-robin races and
  ``run_study``) and ``estimator_report`` (summaries, tables, figures, JSON).
"""
