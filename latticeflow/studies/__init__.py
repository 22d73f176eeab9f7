"""Studies that the analysis scripts run and report.

* ``sampler_race``: the equal-wall-time race both sampler studies share (sampling loop, HMC and
  neural-MCMC blocks, Γ-method estimates with the ``reliable`` flag, cost per independent sample).
* ``freezing``: HMC against neural MCMC across β (topological freezing of 2D U(1)).
* ``critical_slowing`` (+ ``critical_slowing_report``): tuned HMC against neural MCMC across L on
  the φ⁴ critical line, with HMC's dynamic exponent.
* ``thermodynamics``: log Z, bounds and reweighting from a trained flow.
* ``bench``: seconds and memory of training steps and sampling, and their scaling with L
  (``latticeflow bench``).
* The estimator study (``analysis/estimator_study.py``): ``estimators`` (what it measures, its
  configuration and measurements), ``estimator_runs`` (the round-robin races and
  ``run_study``) and ``estimator_report`` (summaries, tables, figures, JSON).
"""
