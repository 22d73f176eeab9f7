"""Studies that the analysis scripts run and report: ``freezing`` (HMC against neural MCMC
across β), ``thermodynamics`` (log Z, bounds and reweighting from a trained flow)."""
