"""Studies that compare samplers or estimators: ``freezing`` (HMC against neural MCMC across β)."""
